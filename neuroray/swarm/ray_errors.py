"""Reading Ray's errors: the holder's own exception inside Ray's wrapper, and whether a holder died.

Every caller of a holder (the trainers, the router, the swarm, the inference engine and its start-up)
asks these two questions; one answer for all of them keeps their error messages and failover alike.
"""

from __future__ import annotations

import re

import ray

from neuroray.errors import PipelineError

_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """Ray wraps an actor's exception in RayTaskError/RayActorError; return the user's cause.

    A cause that is itself a RayTaskError (the holder was waiting on another task's failed result) is
    unwrapped too: the user needs the innermost exception, not Ray's chain of wrappers.
    An actor whose ``__init__`` raised comes back as ActorDiedError whose text ends with the original
    ``Type: message`` line; that line is what a user needs, not Ray's traceback around it.
    """
    while isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    if isinstance(exc, ray.exceptions.RayActorError) and getattr(exc, "actor_init_failed", False):
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if re.match(r"^[\w.]+(Error|Exception): ", line)), lines[-1])
        return PipelineError(f"a stage holder could not start: {last}")
    return exc


def holder_died(exc: BaseException) -> bool:
    """True when ``exc`` says the holder's process is gone (or unreachable), not that its code raised."""
    if isinstance(exc, _DIED):
        return True
    return isinstance(exc, ray.exceptions.RayTaskError) and isinstance(getattr(exc, "cause", None), _DIED)


def user_error(exc: BaseException, what: str) -> BaseException:
    """The user's error inside a failed holder call, else a PipelineError saying ``what`` failed."""
    cause = unwrap_ray_error(exc)
    return cause if cause is not exc else PipelineError(f"{what} failed: {str(exc).strip().splitlines()[0]}")
