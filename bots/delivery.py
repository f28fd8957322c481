"""Delivery to platforms: a platform message taken in, answered into its reply target.

:class:`Platforms` is what a platform connector's one call reaches: ``receive(message,
target)`` routes the message to a bot, records it durably (platform retries dropped in the
same step) and answers it in the background, one answer at a time per thread across
daemons; ``resume`` and ``serve`` answer what an earlier run, or another daemon, accepted
but did not deliver. The record is cleared once the platform has the final answer.

:class:`Delivery` shows one answer while it is written: the policy, the same for every
platform. The reply target (``connectors/reply.py``) says *how* to show a text on its
platform; :class:`Delivery` decides *when*: a placeholder first where the platform has one,
the first text as soon as there is some, then no more often than the target's interval
(later still when the platform asked to slow down), and once more at the end with the
whole answer. Targets that cannot edit get the final text only. After every new post
the posted ids are recorded in the durable inbox, so that a replay edits, never reposts.
Before every post and edit the inbox confirms the message is still this daemon's (the
target's fence): once another daemon has taken it over, :class:`~core.inbox.NotOwned`
stops this delivery and nothing more is shown from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable

import structlog

from bots import feedback, texts
from bots.answers import JobAnswer, language
from bots.bursts import Bursts
from bots.notice import Standing, notice_text, standing
from bots.pipeline import AnswerPipeline
from bots.routing import route
from bots.tasks import TaskRegistry
from connectors.base import Edge
from connectors.reply import ReplyTarget
from connectors.waiting import with_notice
from core import metrics
from core.config import Config, Settings
from core.dispatch import Answer, Busy, Interrupted, Rejected
from core.inbox import Inbox, NotOwned
from core.lease import turn
from core.messages import Finish, InboundMessage, ReplyEvent
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.service")


class Delivery:
    """One message's answer going to its reply target."""

    # The waiting notice: shown when the answer has not started after ``notice_after_s`` (0: never),
    # from where ``standing`` says the answer waits (set by :class:`Platforms`).
    notice_after_s: float = 0.0
    standing: Callable[[Answer], Standing | None] | None = None

    def __init__(self, msg: InboundMessage, target: ReplyTarget, inbox: Inbox | None = None,
                 lang: texts.Lang | None = None) -> None:
        self.msg = msg
        self.target = target
        self.inbox = inbox
        # The language of botd's own texts for this message (the service decides it from the
        # bot's setting); without one, the message's own language.
        self.lang: texts.Lang = lang or texts.language("auto", msg.text if msg.readable else "")
        self.shown = ""
        self.text = ""  # the last text given to the target (shown, or being shown)
        if inbox is not None:
            target.fence = inbox.fence(msg)

    async def _notice(self, answer: Answer) -> None:
        """The answer has not started in time: tell the user where they stand, once per turn
        (a replay after a restart does not repeat it). Where the platform edits, the notice is
        the answer's first part and the answer replaces it; elsewhere it is a message of its own."""
        assert self.standing is not None
        st = self.standing(answer)
        if st is None:
            return  # generating already (reading a long prompt): no place in line to tell
        said = notice_text(st, self.lang)
        if self.target.edits:
            await self.show(said)
        else:
            await self.target.notice(said)
        if self.inbox is not None:
            await self.inbox.note_progress(self.msg, {"noticed": True})
        metrics.QUEUE_NOTICES.labels(self.msg.platform).inc()
        log.info("waiting notice shown", ahead=st.ahead, wait_s=round(st.wait_s, 1))

    async def show(self, text: str) -> None:
        self.text = text
        async for sent in self.target.updates(text):
            if self.inbox is not None:
                await self.inbox.note_progress(self.msg, {"sent": sent})
        self.shown = text

    async def stream(self, answer: Answer) -> str:
        """Show the answer as it grows; returns the final text ("" when it failed)."""
        target = self.target
        next_at = 0.0
        if target.placeholder is not None and target.edits and not target.sent:
            await self.show(target.placeholder)
            next_at = time.monotonic() + target.interval
        text = ""
        final: ReplyEvent | None = None
        after = self.notice_after_s if self.standing is not None and not self.msg.progress.get("noticed") else 0.0
        async for ev in with_notice(answer.events(), after, functools.partial(self._notice, answer)):
            if ev.done:
                final = ev
                break
            text += ev.delta
            if target.edits and text.strip() and time.monotonic() >= max(next_at, target.not_before):
                await self.show(text)
                next_at = time.monotonic() + target.interval
        if final is not None and final.finish_reason == Finish.SHUTDOWN:
            raise Interrupted(answer.id)
        if final is not None and final.finish_reason == Finish.EXPIRED:
            # Waited its whole turn without a free model: nothing was generated.
            await self.show(texts.say("BUSY", self.lang, s=final.retry_after or 5))
            return ""
        if final is None or final.finish_reason in (Finish.ERROR, Finish.CANCELLED) or (
                not target.edits and not final.text.strip()):
            failed = texts.say("FAILED", self.lang)
            await self.show(f"{text}\n\n{failed}" if text.strip() and target.edits else failed)
            return ""
        # Complete: the target's after-effects (Slack follows the thread) happen before the user
        # can see the last words, so a reply to them finds them done.
        await target.answered()
        if final.text != self.shown:
            wait = next_at - time.monotonic()
            if wait > 0:  # the last edit keeps the interval too
                await asyncio.sleep(wait)
            await self.show(final.text if final.text.strip() else texts.say("EMPTY", self.lang))
        return final.text


class Platforms:
    """Platform messages: received, recorded, answered into their reply targets, resumed."""

    def __init__(self, settings: Settings, runtime: Runtime, tasks: TaskRegistry, answers: AnswerPipeline) -> None:
        self.settings = settings
        self.runtime = runtime
        self.tasks = tasks
        self.answers = answers
        # Quick messages of one sender in one thread, gathered into one turn ([queue] debounce_s).
        self.bursts = Bursts(settings, runtime.inbox, tasks, self._answer)

    @property
    def cfg(self) -> Config:
        return self.settings.config

    async def receive(self, msg: InboundMessage, target: ReplyTarget) -> bool:
        """Record a platform message and answer it in the background; False when it is a
        platform retry or comes from outside the account's allow-lists."""
        account = target.account
        msg.account = msg.account or account.name
        # [[routes]], then the account's routes decide the bot (and so its knowledge bases); only a
        # rule's `pattern` looks at the text.
        msg.bot = await route(self.cfg.routes, msg, account, lambda: target.user_groups(msg.user))
        if account.admits(msg.chat, msg.user) is False and not account.tell_refused:
            log.info("message from outside the allow-lists ignored", platform=msg.platform, chat=msg.chat,
                     user=msg.user)
            return False
        if not await self.runtime.inbox.accept(msg, account.connector):
            return False
        self.bursts.add(msg, target, account.connector)
        return True

    async def resume(self, connectors: dict[str, Edge]) -> None:
        """Answer what an earlier run accepted but did not deliver (crash, kill -9, SIGTERM)."""
        try:
            pending = await self.runtime.inbox.pending()
        except StoreUnavailable:
            log.warning("cannot read the durable inbox: redis unreachable; earlier messages wait for the next start")
            return
        await self._take_over(pending, connectors, "answering messages accepted before the restart")

    async def serve(self, connectors: dict[str, Edge], stop: asyncio.Event) -> None:
        """Until ``stop`` is set: keep this daemon's messages from being taken over (they are
        being answered) and take over those of daemons that stopped answering theirs. (An
        event, not a cancellation, ends it: redis-py can swallow a cancellation.)"""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.redis.lease_s / 3)
            if stop.is_set():
                return
            try:
                await self.runtime.inbox.keep_alive()
                if self.runtime.worker.accepting:  # a stopping daemon takes on nothing new
                    claimed = await self.runtime.inbox.claim()
                    await self._take_over(claimed, connectors, "answering messages another daemon left")
            except StoreUnavailable:
                pass  # logged by the store; tried again next round

    async def _take_over(self, pending: list[tuple[str, InboundMessage]], connectors: dict[str, Edge],
                         event: str) -> None:
        counts: dict[str, int] = {}
        for name, msg in pending:
            connector = connectors.get(name)
            if connector is None:
                # Not kept alive here: another daemon that runs this connector takes it over.
                self.runtime.inbox.let_go(msg)
                log.warning("a message waits for a daemon that runs its connector", connector=name)
                continue
            target = connector.target(msg)
            if target is None:
                log.warning("a message accepted before the restart cannot be answered: its account is no longer "
                            "configured; dropped", connector=name, bot=msg.bot)
                await self.runtime.inbox.done(msg)
                continue
            counts[name] = counts.get(name, 0) + 1
            if msg.progress or msg.final_answer is not None:
                self.tasks.spawn(self._answer(msg, target), name)  # its answer had begun: a turn of its own
            else:
                self.bursts.add(msg, target, name)  # pieces of a burst not merged yet are gathered again
        if counts:
            log.info(event, counts=counts)

    async def _answer(self, msg: InboundMessage, target: ReplyTarget) -> None:
        structlog.contextvars.bind_contextvars(platform=msg.platform, bot=msg.bot, chat=msg.chat,
                                               request_id=msg.request_id)
        # The language of every text botd says about this message: decided once, here.
        lang = language(self.cfg, msg)
        delivery = Delivery(msg, target, self.runtime.inbox, lang)
        delivery.notice_after_s = self.cfg.queue.notice_after_s
        delivery.standing = functools.partial(standing, self.runtime)
        try:
            if not await self._admitted(msg, target):
                log.info("user not allowed", user=msg.user)
                await delivery.show(texts.say("NOT_ALLOWED", lang))
            elif not msg.readable and not msg.attachments:
                # (Files, pictures and voice are read into the turn: bots/attachments.py.)
                await delivery.show(texts.say("NOT_TEXT", lang))
            else:
                # One answer at a time per thread, across daemons: the next message of the thread
                # waits, and its prompt holds this exchange.
                async with turn(self.runtime.redis, self.cfg.redis.key_prefix, f"thread:{msg.thread_key}",
                                self.cfg.redis.lease_s, self.cfg.server.instance_name()) as lease:
                    if lease is not None:
                        self.answers.turns[msg.request_id] = lease
                    typing = asyncio.create_task(self._typing(target)) if target.typing_every_s else None
                    try:
                        await self._reply(msg, delivery)
                    finally:
                        self.answers.turns.pop(msg.request_id, None)
                        if typing is not None:
                            typing.cancel()
        except Interrupted:
            log.info("answer interrupted by shutdown; it is answered after the restart")
            return
        except NotOwned:
            # Another daemon answers it now (this one was cut off from Redis past the lease):
            # nothing more is shown from here, and its record is the other daemon's to clear.
            target.abandon()
            return
        except Exception as exc:  # one bad message must never take the daemon down
            await target.failed(exc, delivery.text)
        try:
            await target.closed(delivery.text)  # a stream that stays open until told (WeCom AI bot)
        except NotOwned:
            target.abandon()
            return
        except Exception as exc:
            await target.failed(exc, delivery.text)
        await self.runtime.inbox.done(msg)

    async def _admitted(self, msg: InboundMessage, target: ReplyTarget) -> bool:
        verdict = target.account.admits(msg.chat, msg.user)
        if verdict is None:
            try:
                groups = await target.user_groups(msg.user)
            except Exception as exc:
                log.warning("cannot look up the user's groups", user=msg.user, error=f"{type(exc).__name__}: {exc}")
                return False
            verdict = any(str(g) in target.account.allow_groups for g in groups)
        return verdict

    async def _reply(self, msg: InboundMessage, delivery: Delivery) -> str:
        try:
            answer = await self.answers.dispatch(msg, delivery.target.download)
        except Busy as exc:
            await delivery.show(exc.user_message or texts.say("BUSY", delivery.lang, s=exc.retry_after))
            return ""
        except Rejected as exc:
            await delivery.show(exc.message)
            return ""
        try:
            text = await delivery.stream(answer)
        finally:
            answer.cancel()  # a no-op once finished; stops the generation if showing failed
        if text and isinstance(answer, JobAnswer):
            await feedback.offer(self.cfg, msg, delivery.target, delivery.lang)  # 👍 / 👎 under it
        return text

    @staticmethod
    async def _typing(target: ReplyTarget) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                with contextlib.suppress(Exception):
                    await target.typing()
                await asyncio.sleep(target.typing_every_s or 5)
