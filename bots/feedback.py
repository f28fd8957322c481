"""Feedback on answers, the bots layer's side: what is recorded, when buttons are offered, and
what a vote is answered.

- :func:`record` keeps an answer's facts (bot, its bases, thread, question, answer, the chunks
  it was given with their ids and scores, model, adapters, latency) in the feedback store
  (:mod:`core.feedback`) when the answer is complete; the pipeline calls it.
- :func:`offer` asks the reply target to put 👍 / 👎 under the answer just delivered (a
  platform without buttons does nothing; the answer's text is never changed).
- :class:`FeedbackDesk` takes a vote or a reason a connector verified and normalised
  (:class:`~core.feedback.FeedbackEvent`): it must name an answer given in the same chat, of a
  bot whose feedback is on, and not be a replayed interaction; it is answered with a short
  acknowledgement, and after a 👎 without a reason with the prompt asking for one.

A bot's ``feedback = false`` turns all of it off: nothing recorded, no buttons, votes refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from bots import texts
from connectors.reply import ReplyTarget
from core import metrics
from core.config import Config, Settings
from core.feedback import AnswerFacts, ChunkRef, FeedbackEvent, FeedbackLabels, FeedbackReply, Vote, VoteStatus
from core.jobs import Job
from core.knowledge.retriever import Hit
from core.messages import InboundMessage
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.feedback")

# Where nobody can press a button: the OpenAI-style HTTP API (its callers keep their own records).
NO_BUTTONS = frozenset({"api"})


def enabled(cfg: Config, bot: str) -> bool:
    """Whether ``bot``'s answers get feedback (``[bots.NAME] feedback``)."""
    b = cfg.bots.get(bot)
    return b is not None and b.feedback


def labels(lang: texts.Lang) -> FeedbackLabels:
    """The buttons' words in ``lang``."""
    return FeedbackLabels(up=texts.say("FEEDBACK_UP", lang), down=texts.say("FEEDBACK_DOWN", lang),
                          prompt=texts.say("FEEDBACK_PROMPT", lang),
                          reason_placeholder=texts.say("FEEDBACK_REASON_HINT", lang))


async def record(runtime: Runtime, cfg: Config, msg: InboundMessage, job: Job, hits: Sequence[Hit],
                 latency_ms: int, finish: str, model: str) -> bool:
    """Keep the facts of ``msg``'s answer (complete, not empty) for feedback; False when not kept
    (the bot's feedback is off, the platform has no buttons, Redis is away)."""
    bot = cfg.bots.get(msg.bot)
    if bot is None or not bot.feedback or msg.platform in NO_BUTTONS or msg.history is not None:
        return False
    facts = AnswerFacts(
        answer_id=msg.request_id, bot=msg.bot, bases=tuple(bot.knowledge), platform=msg.platform,
        account=msg.account, chat=msg.chat, thread=msg.thread, user=msg.user, question=msg.text, answer=job.text,
        chunks=tuple(ChunkRef.of(h) for h in hits), model=model, adapters=tuple(a.path for a in bot.lora),
        latency_ms=latency_ms, finish=finish)
    try:
        await runtime.feedback.record_answer(facts)
    except StoreUnavailable:
        log.warning("could not record the answer for feedback: redis unreachable", answer=msg.request_id)
        return False
    return True


async def offer(cfg: Config, msg: InboundMessage, target: ReplyTarget, lang: texts.Lang) -> None:
    """Put 👍 / 👎 under ``msg``'s answer, now delivered in ``target`` (never changing its text);
    a platform that refuses is logged, the answer stands."""
    if not enabled(cfg, msg.bot) or msg.platform in NO_BUTTONS:
        return
    try:
        await target.offer_feedback(msg.request_id, labels(lang))
    except Exception as exc:  # the answer is delivered; buttons are a nicety
        log.warning("could not show the feedback buttons", error=f"{type(exc).__name__}: {exc}")


class FeedbackDesk:
    """Votes and reasons from the platforms, checked and stored."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime

    async def handle(self, event: FeedbackEvent) -> FeedbackReply:
        cfg = self.settings.config
        store = self.runtime.feedback
        try:
            status, facts = await store.check(event)
            lang = self._lang(cfg, facts)
            if facts is not None and not enabled(cfg, facts.bot):
                status = VoteStatus.OFF
            if status != VoteStatus.RECORDED:
                log.info("feedback refused", platform=event.platform, answer=event.answer_id, status=str(status))
                # A replay is not answered at all: the user already had their acknowledgement.
                said = "" if status in (VoteStatus.REPLAYED, VoteStatus.INVALID) else texts.say("FEEDBACK_GONE", lang)
                return FeedbackReply(status, said)
            if event.vote is not None:
                status = await store.vote(event.answer_id, event.user, event.vote)
                if facts is not None and event.vote != Vote.NONE and status in (VoteStatus.RECORDED,
                                                                                 VoteStatus.CHANGED):
                    metrics.BOT_FEEDBACK.labels(facts.bot, str(event.vote)).inc()
            reason = event.reason.strip()
            if reason:
                reason_status = await store.add_reason(event.answer_id, event.user, reason)
                if event.vote is None:
                    status = reason_status
        except StoreUnavailable:
            log.warning("feedback not stored: redis unreachable", platform=event.platform, answer=event.answer_id)
            return FeedbackReply(VoteStatus.UNKNOWN, texts.say("STORE_DOWN", "both"))
        log.info("feedback", platform=event.platform, bot=facts.bot if facts else "", answer=event.answer_id,
                 vote=str(event.vote) if event.vote else None, reason=bool(reason), status=str(status))
        if reason:
            return FeedbackReply(status, texts.say("FEEDBACK_REASON_THANKS", lang))
        ask = texts.say("FEEDBACK_ASK_REASON", lang) if event.vote == Vote.DOWN else ""
        return FeedbackReply(status, texts.say("FEEDBACK_THANKS", lang), ask)

    @staticmethod
    def _lang(cfg: Config, facts: AnswerFacts | None) -> texts.Lang:
        if facts is None:
            return "both"
        bot = cfg.bots.get(facts.bot)
        return texts.language(bot.language if bot is not None else "auto", facts.question)
