"""``data.tokenizer=``: Genesis builds the embedded dataset with the user's tokenizer instead of training one.

The tokenizer is a neuroray-trained one, given as a ``tokenizer.json`` and as a Hugging Face directory
saved by transformers' ``PreTrainedTokenizerFast``. Both build the same shards; the manifest records
the tokenizer's hash; the settings hash keys on it; a dataset tokenized with another tokenizer is refused
naming both hashes. Ray-free.
"""

from __future__ import annotations

import numpy as np
import pytest

from neuroray.configure import load_config
from neuroray.errors import ConfigError, DataError
from neuroray.genesis.build import dataset_url, ensure_dataset
from neuroray.genesis.own_tokenizer import load_user_tokenizer
from neuroray.genesis.tokenizer import BOS_ID, EOS_ID, tokenizer_hash, train_tokenizer
from tests.test_genesis_corpus import paragraphs, quiet

transformers = pytest.importorskip("transformers")


def _data(tmp, store: str, *extra: str):
    return load_config([f"data.store={tmp / store}", f"data.cache_dir={tmp / 'cache'}", "data.shard_tokens=50000",
                        *extra]).data


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(dir, neuroray tokenizer, its tokenizer.json, a transformers directory holding it, another tokenizer.json)."""
    tmp = tmp_path_factory.mktemp("own_tok")
    tok = train_tokenizer(paragraphs(200), 300)
    (tmp / "tok.json").write_text(tok.to_str())
    hf = tmp / "hf_tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                         pad_token="<|pad|>").save_pretrained(hf)
    (tmp / "other.json").write_text(train_tokenizer(paragraphs(200, seed=1), 320).to_str())
    return tmp, tok, tmp / "tok.json", hf, tmp / "other.json"


def test_the_embedded_dataset_builds_with_a_given_tokenizer(tokenizers):
    tmp, tok, file, hf, _ = tokenizers
    sha = tokenizer_hash(tok)
    assert load_user_tokenizer(file)[1] == sha == load_user_tokenizer(hf)[1]  # one identity, two forms
    root, manifest = ensure_dataset(_data(tmp, "a", f"data.tokenizer={file}"), log=quiet)
    assert manifest.tokenizer_sha256 == sha and manifest.vocab_size == 300  # not data.vocab_size=4096
    assert manifest.parent_tokenizer_sha256 is None and manifest.dtype == "uint16"
    assert load_user_tokenizer(root.local / manifest.tokenizer_file)[1] == sha  # the stored file is that tokenizer
    shard = np.fromfile(root.local / manifest.shards[0]["file"], dtype=np.uint16)
    assert shard[0] == BOS_ID and (shard == EOS_ID).sum() > 10 and shard.max() < 300
    first_doc = shard[1:int(np.argmax(shard == EOS_ID))].tolist()
    assert tok.decode(first_doc) and tok.encode(tok.decode(first_doc), add_special_tokens=False).ids == first_doc
    # the transformers directory: the same tokenizer, so the same settings hash and the very same shards
    data_hf = _data(tmp, "b", f"data.tokenizer={hf}")
    _, manifest_hf = ensure_dataset(data_hf, log=quiet)
    assert dataset_url(data_hf).rsplit("/", 1)[1] == dataset_url(_data(tmp, "a", f"data.tokenizer={file}")).rsplit(
        "/", 1)[1]
    assert [s["sha256"] for s in manifest_hf.shards] == [s["sha256"] for s in manifest.shards]


def test_the_tokenizer_keys_the_dataset(tokenizers):
    tmp, _, file, _, other = tokenizers
    own, another, trained = (dataset_url(_data(tmp, "a", *x)) for x in
                             ([f"data.tokenizer={file}"], [f"data.tokenizer={other}"], []))
    assert len({own, another, trained}) == 3


def test_a_dataset_of_another_tokenizer_is_refused(tokenizers):
    tmp, tok, file, _, other = tokenizers
    url = dataset_url(_data(tmp, "a", f"data.tokenizer={file}"))
    ensure_dataset(_data(tmp, "a", f"data.tokenizer={file}"), log=quiet)
    other_sha = load_user_tokenizer(other)[1]
    with pytest.raises(DataError, match=f"data.tokenizer has sha256 {other_sha[:12]}.*{tokenizer_hash(tok)[:12]}"
                                        r".*rebuild the dataset with this tokenizer") as exc:
        ensure_dataset(_data(tmp, "a", f"data.dataset={url}", f"data.tokenizer={other}"), log=quiet)
    assert "\n" not in str(exc.value)
    ensure_dataset(_data(tmp, "a", f"data.dataset={url}", f"data.tokenizer={file}"), log=quiet)  # its own: fine


def test_a_given_tokenizer_is_not_grown(tokenizers):
    tmp, _, file, _, other = tokenizers
    with pytest.raises(ConfigError, match="set only one of them"):
        _data(tmp, "a", f"data.tokenizer={file}", f"data.base_tokenizer={other}")
