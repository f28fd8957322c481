"""connectors/http_status.py alone: busy / rejected / unavailable / unfinished answers as HTTP
statuses, written once for the HTTP API and the web console."""

from __future__ import annotations

from connectors.http_status import HttpOutcome, finish_outcome, outcome_of, unavailable
from core.dispatch import Busy, Rejected
from core.messages import Finish, ReplyEvent
from core.redis_store import StoreUnavailable


def test_busy_is_503_with_retry_after_and_a_per_user_limit_is_429():
    busy = outcome_of(Busy("queue full", 7))
    assert busy == HttpOutcome(503, "busy", "busy, try again in 7 s: queue full", 7)
    assert busy.headers == {"Retry-After": "7"}
    limited = outcome_of(Busy("20 messages a minute", 30, per_user=True, user_message="慢一点 / slow down"))
    assert limited is not None and (limited.status, limited.code) == (429, "rate_limited")
    assert limited.message == "慢一点 / slow down" and limited.headers == {"Retry-After": "30"}


def test_a_rejection_keeps_its_status_and_code_and_says_no_retry():
    o = outcome_of(Rejected(413, "input_too_long", "the message has 9 characters; the limit is 8"))
    assert o == HttpOutcome(413, "input_too_long", "the message has 9 characters; the limit is 8")
    assert o.headers is None


def test_an_unreachable_store_is_503_with_retry_after():
    assert outcome_of(StoreUnavailable("redis down")) == unavailable()
    o = unavailable("redis is unreachable: logins cannot be checked")
    assert (o.status, o.code, o.headers) == (503, "store_unavailable", {"Retry-After": "5"})


def test_anything_else_is_not_an_outcome():
    assert outcome_of(ValueError("a bug")) is None


def test_an_answer_that_did_not_complete():
    assert finish_outcome(ReplyEvent(finish_reason=Finish.STOP, text="hi"), 5) is None
    assert finish_outcome(ReplyEvent(finish_reason=Finish.LENGTH, text="hi"), 5) is None
    failed = finish_outcome(ReplyEvent(finish_reason=Finish.ERROR, error="engine gone"), 5)
    assert failed == HttpOutcome(500, "generation_failed", "engine gone")
    expired = finish_outcome(ReplyEvent(finish_reason=Finish.EXPIRED), 5)
    assert expired == HttpOutcome(503, "busy", "busy, try again in 5 s: no free slot", 5)
    told = finish_outcome(ReplyEvent(finish_reason=Finish.EXPIRED, retry_after=9), 5)
    assert told is not None and told.retry_after == 9
    stopping = finish_outcome(ReplyEvent(finish_reason=Finish.SHUTDOWN), 5)
    assert stopping is not None and (stopping.status, stopping.code) == (503, "shutdown")
    assert "the daemon is shutting down; the answer is incomplete" in stopping.message
    cancelled = finish_outcome(ReplyEvent(finish_reason=Finish.CANCELLED), 5)
    assert cancelled is not None and (cancelled.status, cancelled.code) == (503, "cancelled")
