"""The chat service: the dispatcher every connector is handed.

For one inbound message it answers a command directly, or loads the thread's history,
builds the prompt within the context budget, queues a job for the inference worker
and returns an answer to stream. When the job finishes, the exchange is appended to
the thread's history and one log line records latency, tokens and queue wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from bots.commands import HELP_TEXT, parse_command
from bots.prompt import InputTooLong, PromptBuilder
from core import metrics
from core.config import BotConfig, Config
from core.dispatch import Busy, Rejected
from core.engines import GenerationRequest
from core.engines.base import TemplateError
from core.jobs import Job, QueueFull
from core.kv import KeyValueCache
from core.messages import ChatTurn, InboundMessage, ReplyEvent, ThreadKey, Usage
from core.ratelimit import LimitExceeded
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.service")


class JobAnswer:
    """An answer produced by the inference worker."""

    def __init__(self, job: Job, service: ChatService, completion: asyncio.Task[None]) -> None:
        self.job = job
        self.id = job.id
        self._service = service
        self._completion = completion

    async def events(self) -> AsyncIterator[ReplyEvent]:
        async for ev in self.job.events():
            if ev.done:
                # The exchange is in the history before the client hears the answer is over,
                # so an immediate next turn always sees it.
                await asyncio.shield(self._completion)
            yield ev

    def cancel(self) -> None:
        if not self.job.done:
            self._service.runtime.worker.cancel(self.job)


class TextAnswer:
    """A fixed answer (a command's reply): one delta and the end."""

    def __init__(self, text: str, request_id: str) -> None:
        self.id = request_id
        self.text = text

    async def events(self) -> AsyncIterator[ReplyEvent]:
        yield ReplyEvent(delta=self.text)
        yield ReplyEvent(finish_reason="stop", text=self.text, usage=Usage())

    def cancel(self) -> None:
        pass


class ChatService:
    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.model_name = cfg.model.name
        self.n_ctx = cfg.model.n_ctx
        self._builder: PromptBuilder | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def apply(self, cfg: Config) -> None:
        """Use a reloaded config from the next message on (bots, prompts, model budget)."""
        self.cfg = cfg
        self.model_name = cfg.model.name
        self.n_ctx = cfg.model.n_ctx
        self._builder = None  # the tokenizer or n_ctx may have changed

    @property
    def builder(self) -> PromptBuilder:
        if self._builder is None:
            assert self.runtime.tokenizer is not None, "runtime not started"
            self._builder = PromptBuilder(self.runtime.tokenizer, self.cfg.model.n_ctx)
        return self._builder

    def bot_names(self) -> list[str]:
        return sorted(self.cfg.bots)

    def health(self) -> dict[str, Any]:
        return self.runtime.health()

    async def first_time(self, platform: str, event_id: str) -> bool:
        return await self.runtime.dedupe.first_time(platform, event_id)

    async def accept(self, msg: InboundMessage, connector: str) -> bool:
        return await self.runtime.inbox.accept(msg, connector)

    async def note_progress(self, msg: InboundMessage, progress: dict[str, Any]) -> None:
        await self.runtime.inbox.note_progress(msg, progress)

    async def finished(self, msg: InboundMessage) -> None:
        await self.runtime.inbox.done(msg)

    @property
    def cache(self) -> KeyValueCache:
        return self.runtime.cache

    async def reset(self, thread: ThreadKey) -> bool:
        try:
            return await self.runtime.history.reset(thread)
        except StoreUnavailable as exc:
            raise Busy("history storage is unreachable; try again shortly", self.cfg.queue.retry_after_s) from exc

    async def history(self, thread: ThreadKey) -> list[ChatTurn]:
        try:
            return await self.runtime.history.load(thread)
        except StoreUnavailable as exc:
            raise Busy("history storage is unreachable; try again shortly", self.cfg.queue.retry_after_s) from exc

    def _bot(self, name: str) -> BotConfig:
        bot = self.cfg.bots.get(name)
        if bot is None:
            raise Rejected(404, "unknown_bot", f"no bot named {name!r}; bots: {', '.join(self.bot_names())}")
        return bot

    async def dispatch(self, msg: InboundMessage) -> JobAnswer | TextAnswer:
        bot = self._bot(msg.bot)
        structlog.contextvars.bind_contextvars(request_id=msg.request_id)
        if len(msg.text) > self.cfg.api.max_input_chars:
            raise Rejected(
                413, "input_too_long",
                f"the message has {len(msg.text)} characters; the limit is {self.cfg.api.max_input_chars}",
            )
        if not msg.text.strip():
            raise Rejected(400, "empty_message", "the message is empty")
        if msg.final_answer is not None:
            # Answered and stored before a restart, not yet shown: show the same words again.
            log.info("replaying a stored answer", platform=msg.platform, bot=msg.bot, chat=msg.chat)
            return TextAnswer(msg.final_answer, msg.request_id)
        if msg.history is None:
            cmd = parse_command(msg.text)
            if cmd is not None:
                return await self._command(cmd.name, msg)

        if not msg.resumed:  # a replayed message was admitted (and counted) before the restart
            try:
                await self.runtime.limits.admit(msg)
            except LimitExceeded as exc:
                metrics.MESSAGES.labels(msg.platform, "rate_limited").inc()
                log.info("rate limited", platform=msg.platform, user=msg.user, chat=msg.chat)
                raise Busy(exc.message, exc.retry_after, per_user=True, user_message=exc.message) from None

        history: list[ChatTurn]
        degraded = False
        if msg.history is not None:
            history = list(msg.history)
        else:
            try:
                history = await self.runtime.history.load(msg.thread_key)
            except StoreUnavailable:
                # Answer anyway: a reply without context beats no reply while Redis is away.
                history, degraded = [], True
                log.warning("history unavailable; answering without it", thread=str(msg.thread_key))

        model = self.cfg.model
        budget = msg.max_tokens or bot.max_tokens or model.max_tokens
        system = msg.system if msg.system is not None else bot.system_prompt
        loop = asyncio.get_running_loop()
        try:
            built = await loop.run_in_executor(None, self.builder.build, system, history, msg.text, budget)
        except InputTooLong as exc:
            raise Rejected(400, "context_length_exceeded", str(exc)) from None
        except TemplateError as exc:
            raise Rejected(400, "invalid_messages", str(exc)) from None

        request = GenerationRequest(
            thread_key=msg.thread_key,
            messages=built.messages,
            max_tokens=budget,
            temperature=msg.temperature if msg.temperature is not None else (
                bot.temperature if bot.temperature is not None else model.temperature),
            top_p=model.top_p,
            repeat_penalty=model.repeat_penalty,
            seed=model.seed,
            stop=msg.stop,
        )
        job = Job(
            user=f"{msg.platform}:{msg.user}",
            request=request,
            keep_thinking=model.keep_thinking,
            timeout_s=self.cfg.queue.job_timeout_s,
            id=msg.request_id,
        )
        try:
            # Replayed messages were accepted before the restart: they take their place regardless of bounds.
            self.runtime.worker.submit(job, force=msg.resumed)
        except QueueFull as exc:
            metrics.MESSAGES.labels(msg.platform, "busy").inc()
            log.info("queue full", platform=msg.platform, user=msg.user, reason=exc.reason)
            raise Busy(exc.reason, exc.retry_after, exc.per_user) from None
        metrics.QUEUE_DEPTH.set(len(self.runtime.queue))
        task = self._spawn(self._complete(msg, job, built.history_used, built.history_dropped, degraded))
        return JobAnswer(job, self, task)

    async def _command(self, name: str, msg: InboundMessage) -> TextAnswer:
        if name == "reset":
            existed = await self.reset(msg.thread_key)
            text = (
                "Done: I have forgotten this conversation."
                if existed
                else "Nothing to forget: this conversation is new."
            )
        else:
            text = HELP_TEXT.format(bot=msg.bot)
        metrics.MESSAGES.labels(msg.platform, f"command_{name}").inc()
        log.info("command", command=name, platform=msg.platform, bot=msg.bot, chat=msg.chat, user=msg.user)
        return TextAnswer(text, msg.request_id)

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _complete(self, msg: InboundMessage, job: Job, used: int, dropped: int, degraded: bool) -> None:
        structlog.contextvars.bind_contextvars(request_id=msg.request_id, job_id=job.id)
        t0 = time.monotonic()
        reason = await job.wait()
        stored = False
        if reason in ("stop", "length", "timeout") and msg.history is None and job.text.strip():
            try:
                await self.runtime.history.append_exchange(
                    msg.thread_key, msg.text, job.text,
                    also=lambda pipe: self.runtime.inbox.add_answer(pipe, msg, job.text),
                )
                stored = True
            except StoreUnavailable:
                log.warning("could not store the exchange: redis unreachable", thread=str(msg.thread_key))
        metrics.MESSAGES.labels(msg.platform, reason).inc()
        await self.runtime.limits.spend(msg, job.usage.total_tokens)
        started = job.started_at or job.finished_at or t0
        latency = (job.finished_at or time.monotonic()) - job.enqueued_at
        decode_s = (job.finished_at or 0) - (job.first_token_at or 0)
        self.runtime.audit.record(
            question=msg.text, answer=job.text, request_id=msg.request_id, platform=msg.platform, bot=msg.bot,
            chat=msg.chat, thread=msg.thread, user=msg.user, finish=reason, sources=[],
            tokens_in=job.usage.prompt_tokens, tokens_out=job.usage.completion_tokens,
            latency_ms=round(latency * 1000), queue_wait_ms=round((started - job.enqueued_at) * 1000),
        )
        log.info(
            "answered" if reason in ("stop", "length") else f"finished: {reason}",
            platform=msg.platform, bot=msg.bot, chat=msg.chat, thread=msg.thread, user=msg.user,
            finish=reason, latency_ms=round(latency * 1000), queue_wait_ms=round((started - job.enqueued_at) * 1000),
            ttft_ms=round(((job.first_token_at or started) - started) * 1000),
            tokens_in=job.usage.prompt_tokens, tokens_out=job.usage.completion_tokens,
            tokens_per_s=round((job.usage.completion_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
            history_used=used, history_dropped=dropped, history_stored=stored, degraded=degraded,
        )

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for the history writes of finished jobs."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
