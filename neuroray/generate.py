"""Text generation: sampling, KV-cached sessions, and the ``python -m neuroray.generate`` entry point.

Generation is one loop (:func:`run_sessions`) over *sessions* and an *engine*. A session is one
prompt being continued: its token ids, how many of them the engine has cached (the position its next
chunk starts at) and its own seeded sampler. An engine turns a group of sessions' uncached tokens
into next-token logits. Two engines exist:

* :class:`LocalEngine` - the whole model in this process with a KV cache (the reference);
* :class:`neuroray.swarm.inference.PipelineEngine` - the same model split over Ray stage holders
  (Driver -> Workers -> Validator), each with its own per-session cache.

Sampling happens here, beside the session, not on a holder: a session's random stream then survives
the loss of any holder, and the pipeline samples exactly what one process would.

CLI (Hydra-style ``key=value``; see :class:`GenerateConfig` for every key)::

    python -m neuroray.generate checkpoint=outputs/<run>/checkpoint prompt="Once upon" \\
        max_new_tokens=64 temperature=0.8 top_k=40 top_p=0.95 seed=0 stages=2
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroray.config import ModelConfig
from neuroray.errors import ConfigError, GenerationError, run_cli
from neuroray.model import StageModule
from neuroray.model.kv_cache import KVCache

# ----- sampling ------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits, then the smallest set whose probability reaches ``top_p``.

    Everything else becomes ``-inf``. ``top_k=0`` and ``top_p=1`` disable each filter. The most likely
    token always survives, so the result can always be sampled from.
    """
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (nucleus sampling).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


class Sampler:
    """Picks the next token from logits: greedy at ``temperature=0``, else temperature + top-k + top-p.

    Each sampler owns a generator seeded with ``seed``, so a session's draws do not depend on how many
    other sessions share the batch or which holders served it.
    """

    def __init__(self, temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0, seed: int = 0):
        if not temperature >= 0:
            raise GenerationError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        if top_k < 0:
            raise GenerationError(f"top_k={top_k} must be >= 0 (0 keeps every token)")
        if not 0 < top_p <= 1:
            raise GenerationError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.detach().float().cpu()
        if self.temperature == 0:
            return int(logits.argmax())
        logits = filter_logits(logits / self.temperature, self.top_k, self.top_p)
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.generator))


# ----- sessions and engines ------------------------------------------------------------------


@dataclass(eq=False)
class Session:
    """One prompt being continued. ``ids[:cached]`` are cached by the engine; the rest is fed next."""

    ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    stop_id: int | None = None
    sid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    prompt_len: int = -1
    cached: int = 0
    done: bool = False
    stop_reason: str = ""  # "stop" (stop token), "length" (max_new_tokens) or "context" (model.max_seq_len)

    def __post_init__(self):
        if not self.ids:
            raise GenerationError('empty prompt: give at least one token (prompt="some text")')
        self.ids = [int(i) for i in self.ids]
        if self.prompt_len < 0:
            self.prompt_len = len(self.ids)
        if self.max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.max_new_tokens == 0:
            self.done, self.stop_reason = True, "length"

    @property
    def new_ids(self) -> list[int]:
        """The tokens generated so far (after the prompt)."""
        return self.ids[self.prompt_len:]

    def check_fits(self, max_seq_len: int) -> None:
        if len(self.ids) > max_seq_len:
            raise GenerationError(
                f"prompt is {len(self.ids)} tokens, longer than the model's context of {max_seq_len} "
                "tokens (model.max_seq_len); shorten the prompt"
            )

    def accept(self, token: int, max_seq_len: int) -> bool:
        """Record a sampled token; False if it was the stop token. Marks the session done when it must stop."""
        if self.stop_id is not None and token == self.stop_id:
            self.done, self.stop_reason = True, "stop"
            return False
        self.ids.append(token)
        if len(self.ids) - self.prompt_len >= self.max_new_tokens:
            self.done, self.stop_reason = True, "length"
        elif len(self.ids) > max_seq_len:  # the new token's position does not exist: nothing more to feed
            self.done, self.stop_reason = True, "context"
        return True

    def extend(self, more_ids: list[int], max_new_tokens: int) -> None:
        """Continue the conversation: append ``more_ids`` (a new user turn) and generate again."""
        if not more_ids and self.cached == len(self.ids):
            raise GenerationError("nothing to continue from: the session ended on its stop token; extend it "
                                  "with at least one token")
        self.prompt_len = len(self.ids) + len(more_ids)
        self.ids.extend(int(i) for i in more_ids)
        self.max_new_tokens, self.done, self.stop_reason = max_new_tokens, max_new_tokens == 0, ""


def pack(group: list[Session], replay: bool = False) -> tuple[torch.Tensor, list[tuple[str, int, int]]]:
    """The packed ``[1, N]`` ids of each session's uncached tokens and ``(sid, start_pos, length)`` per session.

    ``replay`` feeds each session's whole history from position 0 (rebuilds a lost cache).
    """
    chunks, requests = [], []
    for s in group:
        start = 0 if replay else s.cached
        chunk = s.ids[start:]
        assert chunk, f"session {s.sid} has nothing to feed"
        chunks.extend(chunk)
        requests.append((s.sid, start, len(chunk)))
    return torch.tensor([chunks], dtype=torch.long), requests


class LocalEngine:
    """The monolith in this process, with one KV cache per session: the reference for the pipeline."""

    def __init__(self, model: StageModule, session_ttl_s: float = 300.0):
        assert model.has_embedding and model.has_head, "LocalEngine runs a whole model (build_monolith)"
        self.model = model.eval()
        self.max_seq_len = model.cfg.max_seq_len
        self.cache = KVCache(range(model.layer_start, model.layer_end), ttl_s=session_ttl_s, name="local")
        self._done: deque = deque()
        self.device = next(model.parameters()).device

    def open(self, session: Session) -> None:
        session.check_fits(self.max_seq_len)

    def groups(self, sessions: list[Session]) -> list[list[Session]]:
        return [sessions] if sessions else []  # one process: one batch, nothing to overlap

    @torch.inference_mode()
    def submit(self, group: list[Session]) -> None:
        x, requests = pack(group)
        caches = self.cache.acquire([(sid, start) for sid, start, _ in requests])
        logits = self.model.forward_cached(x.to(self.device), caches, [n for _, _, n in requests], last_only=True)
        self._done.append((group, logits.float().cpu()))

    @property
    def in_flight(self) -> int:
        return len(self._done)

    def wait(self) -> tuple[list[Session], torch.Tensor]:
        return self._done.popleft()

    def close(self, session: Session) -> None:
        self.cache.close(session.sid)


def run_sessions(engine, sessions: list[Session], on_token: Callable[[Session, int], None] | None = None,
                 close_done: bool = True) -> list[Session]:
    """Generate until every session is done; ``on_token(session, token)`` sees each token as it comes.

    The engine groups sessions (by route, in pipeline-filling microbatches); every group is kept in
    flight until its sessions finish, so a pipeline's stages work on different groups at once.
    ``close_done=False`` keeps finished sessions' caches (to :meth:`Session.extend` them later).
    """
    for s in sessions:
        engine.open(s)
    for group in engine.groups([s for s in sessions if not s.done]):
        engine.submit(group)
    while engine.in_flight:
        group, logits = engine.wait()
        assert logits.shape[0] == len(group), "one row of logits per session"
        for s, row in zip(group, logits):
            s.cached = len(s.ids)  # every token fed so far is now in the holders' caches
            token = s.sampler(row)
            if s.accept(token, engine.max_seq_len) and on_token is not None:
                on_token(s, token)
            if s.done and close_done:
                engine.close(s)
        rest = [s for s in group if not s.done]
        if rest:
            engine.submit(rest)
    return sessions


@torch.no_grad()
def sample(model: StageModule, token_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 40, seed: int = 0, stop_id: int | None = None, top_p: float = 1.0) -> list[int]:
    """Generate up to ``max_new_tokens`` after ``token_ids`` in this process, with the KV cache.

    ``temperature=0`` is greedy. Stops early at ``stop_id`` or when the context is full.
    """
    session = Session(list(token_ids), max_new_tokens, Sampler(temperature, top_k, top_p, seed), stop_id)
    run_sessions(LocalEngine(model), [session])
    return session.new_ids


# ----- checkpoints ----------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """What generation needs from a checkpoint directory, checked for consistency."""

    path: Path
    model: ModelConfig
    vocab_size: int
    state: dict[str, torch.Tensor]
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_sha256: str

    def monolith(self) -> StageModule:
        from neuroray.model import build_monolith

        model = build_monolith(self.model, self.vocab_size)
        load_weights(model, self.state, self.path)
        return model.eval()


def load_weights(module: StageModule, state: dict[str, torch.Tensor], where) -> None:
    """Load the keys of ``state`` that ``module`` holds; CheckpointError if any is missing or misshapen."""
    from neuroray.checkpoint import CheckpointError

    wanted = module.state_dict().keys()
    try:
        module.load_state_dict({k: state[k] for k in wanted}, strict=True)
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint at {where} does not fit its own meta.json model config ({first}); "
            "it is damaged or was edited: use the directory a training run wrote"
        ) from None


def load_for_inference(checkpoint: str | Path, tokenizer: str | Path = "") -> LoadedCheckpoint:
    """Read a checkpoint and its tokenizer, refusing a tokenizer that is not the one the model was trained with."""
    from neuroray.checkpoint import TOKENIZER_FILE, CheckpointError, load_checkpoint
    from neuroray.genesis import load_tokenizer
    from neuroray.genesis.tokenizer import tokenizer_hash

    if not str(checkpoint):
        raise ConfigError("checkpoint= is required: pass a checkpoint directory (a training run writes <run_dir>/checkpoint)")
    path = Path(checkpoint).expanduser()
    state, meta = load_checkpoint(path)
    try:
        model_cfg = ModelConfig(**meta["model"])
        vocab_size, want = int(meta["vocab_size"]), str(meta["tokenizer_sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint at {path} has an incomplete meta.json ({exc!r} missing or wrong); "
                              "use the directory a training run wrote") from None
    tok_path = Path(tokenizer).expanduser() if str(tokenizer) else path / TOKENIZER_FILE
    if not tok_path.is_file():
        raise CheckpointError(f"no tokenizer at {tok_path}; pass tokenizer=<the tokenizer.json the model was trained with>")
    tok = load_tokenizer(tok_path)
    got = tokenizer_hash(tok)
    if got != want:
        raise CheckpointError(
            f"tokenizer {tok_path} (sha256 {got[:12]}...) does not match the checkpoint's tokenizer "
            f"(sha256 {want[:12]}...); use the tokenizer.json saved with the checkpoint"
        )
    if tok.get_vocab_size() > vocab_size:  # same hash makes this impossible unless meta.json was edited
        raise CheckpointError(f"tokenizer has {tok.get_vocab_size()} tokens but the model only {vocab_size}")
    return LoadedCheckpoint(path, model_cfg, vocab_size, state, tok, got)


def encode_prompt(tok, prompt: str, bos: bool, max_seq_len: int) -> list[int]:
    """Token ids of ``prompt`` (after BOS, as documents start in training); GenerationError if empty or too long."""
    from neuroray.genesis.tokenizer import BOS_ID, encode

    if not prompt:
        raise GenerationError('empty prompt: pass prompt="some text"')
    ids = ([BOS_ID] if bos else []) + encode(tok, prompt)
    if len(ids) > max_seq_len:
        raise GenerationError(
            f"prompt is {len(ids)} tokens, longer than the model's context of {max_seq_len} tokens "
            "(model.max_seq_len); shorten the prompt"
        )
    return ids


class TextStream:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok, write: Callable[[str], None]):
        self.tok, self.write, self.ids, self.emitted = tok, write, [], ""

    def push(self, token: int) -> None:
        from neuroray.genesis import decode

        self.ids.append(token)
        text = decode(self.tok, self.ids)
        if text.endswith("\ufffd"):  # a byte-level token split a character: wait for the rest
            return
        self.write(text[len(self.emitted):])
        self.emitted = text


# ----- CLI ------------------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    """Keys of ``python -m neuroray.generate key=value ...``."""

    checkpoint: str = ""  # checkpoint directory (model.safetensors, meta.json, tokenizer.json)
    prompt: str = ""
    tokenizer: str = ""  # "": the checkpoint's tokenizer.json
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    stages: int = 2  # stage holders the model is split over; 0: generate in this process, without Ray
    replicas: int = 1  # holders per layer range; 2+ lets a session fail over when a holder dies
    bos: bool = True  # start the prompt with <|bos|>, as every training document starts
    stop_at_eos: bool = True
    address: str = ""  # Ray address; "": RAY_ADDRESS if set, else start a local Ray
    swarm: str = ""  # name of a running inference swarm to use (started from the checkpoint if absent)
    keep_swarm: bool = False  # leave the swarm running (detached) for later commands; needs address
    key_dir: str = "~/.cache/neuroray/keys"  # holder identities (secp256k1 keys that sign inference proofs)
    ledger: str = ""  # a training run's ledger.sqlite: credit the holders' signed inference proofs there
    cpus_per_holder: float = 0.0
    gpus_per_holder: float = 0.0
    torch_threads: int = 1
    session_ttl_s: float = 300.0
    step_timeout_s: float = 120.0


USAGE = ("usage: python -m neuroray.generate checkpoint=DIR prompt=TEXT [key=value ...]\n  keys: "
         + ", ".join(f"{f.name} (default {f.default!r})" for f in dataclasses.fields(GenerateConfig)))

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_overrides(argv: list[str]) -> GenerateConfig:
    """``key=value`` strings into a :class:`GenerateConfig`; ConfigError naming the bad one otherwise."""
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    values: dict = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("+")
        if not sep:
            raise ConfigError(f"bad argument {arg!r}: expected key=value; valid keys: {', '.join(fields)}")
        if key not in fields:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(fields)}")
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            raw = raw[1:-1]  # Hydra strips quotes that survived the shell
        kind = type(fields[key].default)
        try:
            if kind is bool:
                if raw.lower() not in _TRUE | _FALSE:
                    raise ValueError(raw)
                values[key] = raw.lower() in _TRUE
            else:
                values[key] = kind(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a valid {kind.__name__}") from None
    cfg = GenerateConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: GenerateConfig) -> None:
    checks = {"max_new_tokens": cfg.max_new_tokens >= 1, "temperature": cfg.temperature >= 0,
              "top_k": cfg.top_k >= 0, "top_p": 0 < cfg.top_p <= 1, "stages": cfg.stages >= 0,
              "replicas": cfg.replicas >= 1, "torch_threads": cfg.torch_threads >= 1,
              "session_ttl_s": cfg.session_ttl_s > 0, "step_timeout_s": cfg.step_timeout_s > 0,
              "cpus_per_holder": cfg.cpus_per_holder >= 0, "gpus_per_holder": cfg.gpus_per_holder >= 0}
    rules = {"max_new_tokens": ">= 1", "temperature": ">= 0 (0 is greedy)", "top_k": ">= 0 (0 is off)",
             "top_p": "in (0, 1]", "stages": ">= 0 (0 runs in this process)", "replicas": ">= 1",
             "torch_threads": ">= 1", "session_ttl_s": "> 0", "step_timeout_s": "> 0",
             "cpus_per_holder": ">= 0", "gpus_per_holder": ">= 0"}
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} must be {rules[key]}")
    if cfg.ledger and cfg.stages == 0:
        raise ConfigError("ledger= needs stages >= 1: inference proofs are signed by stage holders")
    if cfg.keep_swarm and not (cfg.swarm and cfg.address):
        raise ConfigError("keep_swarm=true needs swarm=<name> and address=<a running Ray cluster>; "
                          "a local Ray stops when this command ends")


def generate(cfg: GenerateConfig, write: Callable[[str], None] = print, log: Callable[[str], None] = print) -> Session:
    """Run one prompt per ``cfg``; ``write`` receives the text as it streams, ``log`` progress lines."""
    from neuroray.genesis.tokenizer import EOS_ID

    loaded = load_for_inference(cfg.checkpoint, cfg.tokenizer)
    stop = EOS_ID if cfg.stop_at_eos else None
    sampler = Sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    stream = TextStream(loaded.tokenizer, write)

    def on_token(_session: Session, token: int) -> None:
        stream.push(token)

    # Checked here, before any holder starts: an empty or too-long prompt fails in a second, not after Ray is up.
    ids = encode_prompt(loaded.tokenizer, cfg.prompt, cfg.bos, loaded.model.max_seq_len)
    if cfg.stages == 0:
        session = Session(ids, cfg.max_new_tokens, sampler, stop)
        write(cfg.prompt)
        run_sessions(LocalEngine(loaded.monolith()), [session], on_token)
        write("\n")
    else:
        from neuroray.swarm.inference import run_pipeline

        session = run_pipeline(cfg, loaded, ids, sampler, stop, write, on_token, log)
    log(f"generate: {len(session.new_ids)} tokens ({session.stop_reason})")
    return session


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()  # stream: each token appears as soon as it is sampled

    return run_cli(lambda: generate(parse_overrides(argv), write, log=lambda line: print(line, file=sys.stderr)) and None)


if __name__ == "__main__":
    sys.exit(main())
