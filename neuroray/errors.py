"""Typed errors for user mistakes and bad input.

Entry points catch :class:`NeurorayError` and print ``neuroray: error: <message>`` as one line, so
every message here must name the cause and the fix on its own.
"""


class NeurorayError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(NeurorayError, ValueError):
    """An unknown override, a wrong type, or values that contradict each other."""


class DataError(NeurorayError):
    """The Genesis dataset is missing, malformed or does not match its manifest."""


class ShardCorruptError(DataError):
    """A shard's bytes do not hash to the SHA-256 its manifest records."""

    def __init__(self, path: str, expected: str, actual: str):
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(
            f"shard {path} is corrupt: sha256 {actual[:12]}… != manifest {expected[:12]}…; "
            "delete it and rerun to rebuild, or re-fetch it from the dataset's store"
        )


class VocabularyShrankError(DataError):
    """The dataset's tokenizer has fewer tokens than the model's vocabulary: a vocabulary only grows."""

    def __init__(self, where: str, tokens: int, model_vocab: int):
        self.where, self.tokens, self.model_vocab = where, tokens, model_vocab
        super().__init__(
            f"the vocabulary shrank: {where} has {tokens} tokens, the model {model_vocab}; a vocabulary only "
            f"grows: rebuild the dataset with data.base_tokenizer=<the run's tokenizer> and data.vocab_size>="
            f"{model_vocab}, or start a new run"
        )


class InteropError(NeurorayError, ValueError):
    """A Hugging Face export or import that cannot be done as asked (not Llama, shapes differ, pickle, ...)."""


class PipelineError(NeurorayError):
    """A stage holder failed in a way training cannot recover from."""


class HopPayloadError(PipelineError, ValueError):
    """A compressed activation or gradient that fails its checks (neuroray/swarm/hop_codec.py); never applied."""

    def __init__(self, sender: str, receiver: str, reason: str):
        self.sender, self.receiver, self.reason = sender, receiver, reason
        super().__init__(f"{receiver} rejected a hop payload sent by {sender}: {reason}; check that holder's "
                         "hardware and that every holder runs the same swarm.hop_compression")


class GenerationError(NeurorayError, ValueError):
    """A generation request that cannot run: an empty prompt, a prompt longer than the context, bad sampling."""


class LabError(NeurorayError):
    """The multi-host lab cannot start, stop or change: no root, no network namespaces, a clash, a bad host."""


class StoreError(NeurorayError):
    """A data or snapshot store that some node of the cluster cannot read (caught at start)."""


def run_cli(action, interrupted: str = "neuroray: interrupted") -> int:
    """Run an entry point's body: a user error is one ``neuroray: error:`` line and exit 2, Ctrl-C exit 130."""
    import sys

    try:
        return action() or 0
    except NeurorayError as exc:
        print(f"neuroray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
