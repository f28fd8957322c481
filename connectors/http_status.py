"""The HTTP status of an outcome that is not an answer, written once for every HTTP edge.

- :class:`~core.dispatch.Busy`: 503 ``busy`` with ``Retry-After`` (the queue is full, a
  knowledge base is loading, Redis is away); a per-user limit is 429 ``rate_limited``;
- :class:`~core.dispatch.Rejected`: its own status and code (400, 404, 413);
- :class:`~core.redis_store.StoreUnavailable`: 503 ``store_unavailable`` with ``Retry-After``;
- a final event whose answer did not complete: 500 ``generation_failed``, or 503 with
  ``Retry-After`` (``busy`` when it waited its turn out, ``shutdown`` / ``cancelled``).

Each edge writes the result in its own envelope (the HTTP API's OpenAI-style error, the
console's JSON error).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.dispatch import Busy, Rejected
from core.messages import Finish, ReplyEvent
from core.redis_store import StoreUnavailable

STORE_RETRY_S = 5  # how soon to try again after Redis was unreachable


@dataclass(frozen=True, slots=True)
class HttpOutcome:
    status: int
    code: str
    message: str
    retry_after: int | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


def unavailable(message: str = "redis is unreachable; try again shortly") -> HttpOutcome:
    """Redis is unreachable (a login, a token revocation or a history cannot be read)."""
    return HttpOutcome(503, "store_unavailable", message, STORE_RETRY_S)


def outcome_of(exc: BaseException) -> HttpOutcome | None:
    """The status of a refusal before any answer; None for anything else (a bug: 500 upstream)."""
    if isinstance(exc, Rejected):
        return HttpOutcome(exc.status, exc.code, exc.message)
    if isinstance(exc, Busy):
        return HttpOutcome(429 if exc.per_user else 503, "rate_limited" if exc.per_user else "busy",
                           exc.user_message or f"busy, try again in {exc.retry_after} s: {exc.reason}",
                           exc.retry_after)
    if isinstance(exc, StoreUnavailable):
        return unavailable()
    return None


def finish_outcome(ev: ReplyEvent, retry_after_s: int) -> HttpOutcome | None:
    """The status of a final event whose answer did not complete; None when it did.
    ``retry_after_s``: ``[queue] retry_after_s``, when the event does not say."""
    reason = Finish(ev.finish_reason or Finish.STOP)
    if reason.complete:
        return None
    if reason is Finish.ERROR:
        return HttpOutcome(500, "generation_failed", ev.error or "generation failed")
    retry = ev.retry_after or retry_after_s
    if reason is Finish.EXPIRED:
        return HttpOutcome(503, "busy", f"busy, try again in {retry} s: {ev.error or 'no free slot'}", retry)
    # shutdown / cancelled: whatever text came is a fragment, not the answer.
    default = "the daemon is shutting down" if reason is Finish.SHUTDOWN else "the answer was cancelled"
    return HttpOutcome(503, reason.value, f"{ev.error or default}; the answer is incomplete, try again", retry)
