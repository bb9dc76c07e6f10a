"""Proof format: canonical bytes, strict parsing, deterministic low-S signatures, backend interop.

The vectors below are checked in: if either backend, the canonical form or the domain tag changes,
these tests fail (and every proof signed before the change would stop verifying).
"""

import hashlib
import json
import os
import stat

import pytest

from neuroray.ponw import crypto
from neuroray.ponw.identity import Identity
from neuroray.ponw.proof import DOMAIN, MAX_INT, Proof, ProofError, SignedProof, canonical_json, loss_to_micro

BACKENDS = crypto.available()
needs_both = pytest.mark.skipif(len(BACKENDS) < 2, reason="coincurve not installed: interop needs both backends")

# Well-known secp256k1 RFC 6979 vector: private key 1, sha256("Satoshi Nakamoto"), low-S r || s.
SATOSHI_SIG = ("934b1ea10a4b3c1757e2b0c017d0b6143ce3c9a7e6a4a49860d7a6ab210ee3d8"
               "2442ce9d2b916064108014783e923ec36b49743e2ffa1c4496f01a512aafd9e5")

# neuroray's own vector: this key and payload must give exactly these bytes and this signature.
VECTOR_SECRET = hashlib.sha256(b"neuroray test vector key 1").digest()
VECTOR_NODE = "4c6fde4b5f68bb137c3aa7d8afcfcc8ce65974959bb3963bc88ae601d0aee8c7"
VECTOR_PUBKEY = "037cf1d95c159b1f25b1d1510ca4c4f75a5b95d6b2232a8a7cd8ebd7a037c635df"
VECTOR_ID = "ad7b17606696de919f8dd635d4e476a32f80e307d2aaf62f3030f9dd6529e8b8"
VECTOR_SIG = ("07d9cdd301bf1fe84a4f00c8f884651d09c9a2fed0e248b2a734b0f6d7ac9eef"
              "4f9ee344f60256820256e30262e827151f95684a6f92a3e48cb058cd81869599")
VECTOR_WIRE_SHA256 = "6653886bd58f439e21ce5bc9a01c9a7c42948d45b8239541442a22a75e4274c7"


def vector_proof(**changes) -> Proof:
    fields = dict(node_id=VECTOR_NODE, proof_type="training", timestamp_ms=1_700_000_000_000,
                  nonce="00112233445566778899aabbccddeeff", outer_round=7, tokens_processed=40 * 1024,
                  training_batches=40, layers_held=2, layer_start=0, has_embedding=True, has_lm_head=False,
                  shard_id=3, data_position=280, theta0_before="11" * 32, theta0_after="22" * 32,
                  pseudo_gradient="33" * 32, theta0_losses=(3_215_000, 3_198_500))
    fields.update(changes)
    return Proof(**fields)


def vector_wire() -> bytes:
    return vector_proof().sign(Identity.from_secret(VECTOR_SECRET), "ecdsa").to_bytes()


# ----- signatures -------------------------------------------------------------------------------
@pytest.mark.parametrize("b", BACKENDS, ids=lambda b: b.name)
def test_known_rfc6979_vector(b):
    digest = hashlib.sha256(b"Satoshi Nakamoto").digest()
    secret = (1).to_bytes(32, "big")
    assert b.sign(secret, digest).hex() == SATOSHI_SIG
    assert b.verify(b.load_public_key(b.public_key(secret)), digest, bytes.fromhex(SATOSHI_SIG))


@pytest.mark.parametrize("b", BACKENDS, ids=lambda b: b.name)
def test_neuroray_vector(b):
    ident = Identity.from_secret(VECTOR_SECRET)
    assert ident.node_id == VECTOR_NODE and ident.public_key.hex() == VECTOR_PUBKEY
    proof = vector_proof()
    assert proof.proof_id == VECTOR_ID
    assert proof.message().startswith(DOMAIN + b'{"data_position":280,"has_embedding":true,')
    signed = proof.sign(ident, b.name)
    assert signed.signature.hex() == VECTOR_SIG
    assert hashlib.sha256(signed.to_bytes()).hexdigest() == VECTOR_WIRE_SHA256
    assert b.verify(b.load_public_key(ident.public_key), proof.digest(), signed.signature)


@needs_both
def test_backends_interoperate_both_ways():
    ec, cc = crypto.ECDSA, crypto.COINCURVE
    for k in range(8):
        secret = hashlib.sha256(b"interop %d" % k).digest()
        digest = hashlib.sha256(b"message %d" % k).digest()
        assert ec.public_key(secret) == cc.public_key(secret)
        s_ec, s_cc = ec.sign(secret, digest), cc.sign(secret, digest)
        assert s_ec == s_cc  # RFC 6979: same key + digest -> same bytes in both
        pub = ec.public_key(secret)
        assert cc.verify(cc.load_public_key(pub), digest, s_ec)
        assert ec.verify(ec.load_public_key(pub), digest, s_cc)


@pytest.mark.parametrize("b", BACKENDS, ids=lambda b: b.name)
def test_signing_is_deterministic_and_low_s(b):
    ident = Identity.generate()
    proof = vector_proof(node_id=ident.node_id)
    sig1, sig2 = proof.sign(ident, b.name).signature, proof.sign(ident, b.name).signature
    assert sig1 == sig2 and crypto.is_low_s(sig1)


@pytest.mark.parametrize("b", BACKENDS, ids=lambda b: b.name)
def test_high_s_twin_is_rejected_by_every_backend(b):
    ident = Identity.generate()
    digest = hashlib.sha256(b"x").digest()
    sig = b.sign(ident.secret, digest)
    twin = crypto.high_s_twin(sig)
    assert twin != sig and not crypto.is_low_s(twin)
    key = b.load_public_key(ident.public_key)
    assert b.verify(key, digest, sig) and not b.verify(key, digest, twin)


@pytest.mark.parametrize("b", BACKENDS, ids=lambda b: b.name)
def test_wrong_key_wrong_digest_and_garbage_do_not_verify(b):
    a, other = Identity.generate(), Identity.generate()
    digest = hashlib.sha256(b"y").digest()
    sig = b.sign(a.secret, digest)
    assert not b.verify(b.load_public_key(other.public_key), digest, sig)
    assert not b.verify(b.load_public_key(a.public_key), hashlib.sha256(b"z").digest(), sig)
    for bad in (b"", b"\x00" * 64, sig[:63], b"\xff" * 64):
        assert not b.verify(b.load_public_key(a.public_key), digest, bad)
    with pytest.raises(ValueError):
        b.load_public_key(b"\x02" + b"\xff" * 32)  # x beyond the field: not a point


def test_der_roundtrip():
    for k in range(20):
        sig = crypto.ECDSA.sign(hashlib.sha256(b"k%d" % k).digest(), hashlib.sha256(b"d%d" % k).digest())
        assert crypto.der_to_compact(crypto.compact_to_der(sig)) == sig


# ----- canonical form and strict parsing ---------------------------------------------------------
def test_roundtrip_and_every_field_is_signed():
    wire = vector_wire()
    signed = SignedProof.from_bytes(wire)
    assert signed.to_bytes() == wire and signed.proof == vector_proof()
    signed_fields = json.loads(wire)["payload"].keys()
    reward_fields = {"node_id", "proof_type", "timestamp_ms", "tokens_processed", "training_batches", "layers_held",
                     "has_embedding", "has_lm_head", "outer_round", "nonce", "shard_id", "theta0_before",
                     "theta0_after", "pseudo_gradient"}
    assert reward_fields <= signed_fields
    assert set(json.loads(wire)) == {"payload", "signature"}  # nothing else travels beside the payload


def _mutate(wire: bytes, fn) -> bytes:
    env = json.loads(wire)
    fn(env)
    return canonical_json(env)


@pytest.mark.parametrize("text, code", [
    (b"{not json", "json"),
    (b'{"payload":{},"payload":{},"signature":"00"}', "json"),  # duplicate key
    (b'[1,2,3]', "schema"),
    (b'"just a string"', "schema"),
    (b'\xff\xfe', "json"),
])
def test_malformed_inputs(text, code):
    with pytest.raises(ProofError) as e:
        SignedProof.from_bytes(text)
    assert e.value.code == code


def test_duplicate_key_inside_payload_is_rejected():
    wire = vector_wire()
    bad = wire.replace(b'"v":1}', b'"v":1,"v":1}')
    with pytest.raises(ProofError, match="duplicate key 'v'"):
        SignedProof.from_bytes(bad)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1.0", b"1e3", b"0.5"])
def test_floats_and_nan_are_rejected(literal):
    bad = vector_wire().replace(b'"outer_round":7', b'"outer_round":' + literal)
    with pytest.raises(ProofError) as e:
        SignedProof.from_bytes(bad)
    assert e.value.code == "json"


def test_oversized_payload_is_rejected_before_parsing():
    with pytest.raises(ProofError) as e:
        SignedProof.from_bytes(b"{" + b" " * 5000 + b"}", max_bytes=4096)
    assert e.value.code == "size"


@pytest.mark.parametrize("variant", [
    lambda w: w.replace(b'","', b'", "'),  # whitespace
    lambda w: w + b"\n",
    lambda w: b" " + w,
    lambda w: w.replace(b'"nonce":"0', b'"nonce":"\\u0030'),  # an escape that decodes to the same string
    lambda w: w.replace(b'"outer_round":7', b'"outer_round":07'),
    lambda w: (b'{"signature":"' + json.loads(w)["signature"].encode() + b'","payload":'
               + canonical_json(json.loads(w)["payload"]) + b"}"),  # key order
])
def test_non_canonical_bytes_are_rejected(variant):
    bad = variant(vector_wire())
    with pytest.raises(ProofError):
        SignedProof.from_bytes(bad)


def test_uppercase_signature_hex_is_rejected():
    wire = vector_wire()
    sig = json.loads(wire)["signature"]
    with pytest.raises(ProofError):
        SignedProof.from_bytes(wire.replace(sig.encode(), sig.upper().encode()))


@pytest.mark.parametrize("field, value", [
    ("training_batches", -1), ("training_batches", True), ("training_batches", MAX_INT + 1),
    ("training_batches", "40"), ("has_embedding", 1), ("proof_type", "mining"), ("node_id", "ab"),
    ("node_id", "A" * 64), ("nonce", "xyz"), ("shard_id", -3), ("theta0_before", "1" * 63),
    ("theta0_losses", [1] * 65), ("theta0_losses", [-1]), ("v", 2), ("layer_start", None),
])
def test_schema_violations(field, value):
    bad = _mutate(vector_wire(), lambda env: env["payload"].__setitem__(field, value))
    with pytest.raises(ProofError) as e:
        SignedProof.from_bytes(bad)
    assert e.value.code == "schema"
    with pytest.raises(ProofError):  # a holder cannot build it either
        vector_proof(**{field: value})


def test_missing_and_extra_fields():
    with pytest.raises(ProofError, match="missing"):
        SignedProof.from_bytes(_mutate(vector_wire(), lambda env: env["payload"].pop("nonce")))
    with pytest.raises(ProofError, match="unexpected"):
        SignedProof.from_bytes(_mutate(vector_wire(), lambda env: env["payload"].__setitem__("bonus", 5)))
    with pytest.raises(ProofError, match="keys payload and signature"):
        SignedProof.from_bytes(_mutate(vector_wire(), lambda env: env.__setitem__("reward", 5)))


def test_sign_refuses_a_foreign_identity():
    with pytest.raises(ProofError, match="cannot sign"):
        vector_proof().sign(Identity.generate())


def test_loss_to_micro():
    assert loss_to_micro(3.2150004) == 3_215_000
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ProofError):
            loss_to_micro(bad)


# ----- identity --------------------------------------------------------------------------------
def test_identity_persists_with_mode_0600(tmp_path):
    path = tmp_path / "keys" / "holder.pem"
    a = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    b = Identity.load_or_create(path)
    assert a.node_id == b.node_id == hashlib.sha256(a.public_key).hexdigest()
    assert len(a.public_key) == 33


def test_identity_refuses_garbage_and_other_curves(tmp_path):
    from ecdsa import NIST256p, SigningKey

    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ValueError, match="not a PEM"):
        Identity.load_or_create(bad)
    other = tmp_path / "p256.pem"
    other.write_bytes(SigningKey.generate(curve=NIST256p).to_pem())
    with pytest.raises(ValueError, match="not secp256k1"):
        Identity.load_or_create(other)
