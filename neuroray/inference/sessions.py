"""Sessions and the generation loop: prompts being continued, packed into batches, and the local engine.

:func:`run_sessions` drives any engine (:class:`LocalEngine` here, or the Ray
:class:`~neuroray.inference.engine.PipelineEngine`) until every session is done.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neuroray.errors import GenerationError
from neuroray.inference.sampling import Sampler
from neuroray.model import StageModule
from neuroray.model.kv_cache import KVCache


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
