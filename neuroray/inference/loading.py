"""Loading a checkpoint for generation: weights, model config and the tokenizer it was trained with; prompts
in, text out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroray.config import ModelConfig
from neuroray.errors import ConfigError, GenerationError
from neuroray.model import StageModule


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
