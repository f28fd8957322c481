"""The chat service: the dispatcher every connector is handed.

For one inbound message it answers a command directly, or loads the thread's history,
builds the prompt within the context budget, queues a job for the inference worker
and returns an answer to stream. When the job finishes, the exchange is appended to
the thread's history and one log line records latency, tokens and queue wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import structlog

from bots.commands import HELP_TEXT, KB_HELP, parse_command
from bots.prompt import BuiltPrompt, InputTooLong, PromptBuilder, fit_documents, with_documents
from bots.texts import KNOWLEDGE_LOADING
from core import metrics
from core.config import BotConfig, Config
from core.dispatch import Busy, Interrupted, Rejected
from core.engines import GenerationRequest
from core.engines.base import TemplateError
from core.jobs import Job, QueueFull
from core.knowledge.retriever import Hit
from core.kv import KeyValueCache
from core.messages import ChatTurn, InboundMessage, ReplyEvent, ThreadKey, Usage
from core.ratelimit import LimitExceeded
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.service")


class JobAnswer:
    """An answer produced by the inference worker; ``hits`` are the documents it was given."""

    def __init__(self, job: Job, service: ChatService, completion: asyncio.Task[None],
                 hits: Sequence[Hit] = ()) -> None:
        self.job = job
        self.id = job.id
        self.hits = list(hits)
        self._service = service
        self._completion = completion

    async def events(self) -> AsyncIterator[ReplyEvent]:
        async for ev in self.job.events():
            if ev.done:
                # The exchange is in the history before the client hears the answer is over,
                # so an immediate next turn always sees it.
                await asyncio.shield(self._completion)
                footer = sources_footer(self.hits) if ev.finish_reason in ("stop", "length") else ""
                if footer and ev.text.strip():
                    # Cited by botd, not by the model: the sources are exactly the chunks it was given.
                    yield ReplyEvent(delta=footer)
                    ev = replace(ev, text=ev.text + footer, sources=tuple(cite_list(self.hits)))
            yield ev

    def cancel(self) -> None:
        if not self.job.done:
            self._service.runtime.worker.cancel(self.job)


def cite_list(hits: Sequence[Hit]) -> list[str]:
    """Each cited (file › heading) once, in order of relevance."""
    return list(dict.fromkeys(h.cite for h in hits))


def sources_footer(hits: Sequence[Hit]) -> str:
    # Plain text on purpose: it reads the same on Telegram, Slack, WeCom and in the API.
    return f"\n\nSources: {'; '.join(cite_list(hits))}" if hits else ""


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
        # Set by the daemon: re-ingest one knowledge base (the admins' "/kb ingest").
        self.ingest_hook: Callable[[str], Awaitable[Any]] | None = None

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
                return await self._command(cmd.name, msg, cmd.args)

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
        hits: list[Hit] = []
        if bot.knowledge:
            # A base still being read or built must not look like a base without the answer.
            loading = await self.runtime.wait_knowledge(list(bot.knowledge), self.cfg.queue.max_wait_s)
            if loading:
                retry = self.cfg.queue.retry_after_s
                metrics.MESSAGES.labels(msg.platform, "busy").inc()
                log.info("knowledge still loading; answered busy", bot=msg.bot, knowledge=loading)
                raise Busy(f"the knowledge base {', '.join(loading)} is still loading", retry,
                           user_message=KNOWLEDGE_LOADING.format(s=retry))
            hits = await self._retrieve(bot, msg)
            if not hits and bot.no_match == "refuse":
                metrics.MESSAGES.labels(msg.platform, "no_document").inc()
                log.info("no relevant document; answered so", platform=msg.platform, bot=msg.bot,
                         knowledge=bot.knowledge)
                self._audit(msg, bot.no_match_text, "no_document", knowledge=bot.knowledge)
                return TextAnswer(bot.no_match_text, msg.request_id)
        try:
            built, hits = await loop.run_in_executor(None, self._build, system, hits, history, msg.text, budget)
        except InputTooLong as exc:
            raise Rejected(400, "context_length_exceeded", str(exc)) from None
        except TemplateError as exc:
            raise Rejected(400, "invalid_messages", str(exc)) from None
        for h in hits:
            metrics.RETRIEVED_CHUNKS.labels(h.kb).inc()

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
            replayed=msg.resumed,
        )
        if msg.durable and not self.runtime.worker.accepting:
            # Shutting down: a recorded message stays in the inbox for the next start, unanswered now.
            raise Interrupted(msg.request_id)
        try:
            # Replayed messages were accepted before the restart: they take their place regardless of bounds.
            self.runtime.worker.submit(job, force=msg.resumed)
        except QueueFull as exc:
            metrics.MESSAGES.labels(msg.platform, "busy").inc()
            log.info("queue full", platform=msg.platform, user=msg.user, reason=exc.reason)
            raise Busy(exc.reason, exc.retry_after, exc.per_user) from None
        metrics.QUEUE_DEPTH.set(len(self.runtime.queue))
        task = self._spawn(self._complete(msg, job, built.history_used, built.history_dropped, degraded, hits))
        return JobAnswer(job, self, task, hits)

    async def _retrieve(self, bot: BotConfig, msg: InboundMessage) -> list[Hit]:
        retriever = self.runtime.retriever
        if retriever is None:
            return []
        t0 = time.monotonic()
        # Only the bot's own grants, from the config: the message cannot name another base.
        hits = await asyncio.get_running_loop().run_in_executor(None, retriever.search, list(bot.knowledge), msg.text)
        metrics.RETRIEVAL.observe(time.monotonic() - t0)
        return hits

    def _build(self, system: str | None, hits: list[Hit], history: list[ChatTurn], text: str,
               budget: int) -> tuple[BuiltPrompt, list[Hit]]:
        """The prompt, with as many retrieved chunks as fit ``[retrieval] context_tokens`` (blocking)."""
        used = fit_documents(self.builder.tokenizer, hits, self.cfg.retrieval.context_tokens)
        return self.builder.build(with_documents(system, used), history, text, budget), used

    async def _command(self, name: str, msg: InboundMessage, args: str = "") -> TextAnswer:
        if name == "kb":
            text = await self._kb_command(msg, args)
        elif name == "reset":
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

    async def _kb_command(self, msg: InboundMessage, args: str) -> str:
        bot = self._bot(msg.bot)
        who = f"{msg.platform}:{msg.user}"
        if who not in bot.admins:
            log.warning("knowledge admin command refused", who=who, bot=msg.bot, command=args)
            return "This command is for the administrators of this bot."
        action = args.split()[0].lower() if args.split() else ""
        if not bot.knowledge:
            return "This bot has no knowledge base."
        if action == "sources":
            retriever = self.runtime.retriever
            lines = []
            for kb in bot.knowledge:
                # Counting 100k chunks is CPU work: off the event loop.
                files = await asyncio.to_thread(retriever.sources, kb) if retriever is not None else {}
                lines.append(f"{kb}: {len(files)} documents, {sum(files.values())} chunks")
                lines += [f"- {src} ({n} chunks)" for src, n in sorted(files.items())]
            return "\n".join(lines)
        if action == "ingest":
            if self.ingest_hook is None:
                return "Ingest is not available here; run `botd kb ingest` on the server."
            for kb in bot.knowledge:
                self._spawn(self.ingest_hook(kb))
            log.info("knowledge re-ingest requested", who=who, knowledge=bot.knowledge)
            return f"Re-ingest started for: {', '.join(bot.knowledge)}. New documents are used once it finishes."
        return KB_HELP

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _complete(self, msg: InboundMessage, job: Job, used: int, dropped: int, degraded: bool,
                        hits: Sequence[Hit] = ()) -> None:
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
        self._audit(msg, job.text, reason, hits, job.usage, latency_ms=round(latency * 1000),
                    queue_wait_ms=round((started - job.enqueued_at) * 1000))
        log.info(
            "answered" if reason in ("stop", "length") else f"finished: {reason}",
            platform=msg.platform, bot=msg.bot, chat=msg.chat, thread=msg.thread, user=msg.user,
            finish=reason, latency_ms=round(latency * 1000), queue_wait_ms=round((started - job.enqueued_at) * 1000),
            ttft_ms=round(((job.first_token_at or started) - started) * 1000),
            tokens_in=job.usage.prompt_tokens, tokens_cached=job.cached_tokens, tokens_out=job.usage.completion_tokens,
            tokens_per_s=round((job.usage.completion_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
            history_used=used, history_dropped=dropped, history_stored=stored, degraded=degraded,
            sources=cite_list(hits),
        )

    def _audit(self, msg: InboundMessage, answer: str, finish: str, hits: Sequence[Hit] = (),
               usage: Usage | None = None, latency_ms: int = 0, queue_wait_ms: int = 0, **extra: Any) -> None:
        usage = usage or Usage()
        self.runtime.audit.record(
            question=msg.text, answer=answer, request_id=msg.request_id, platform=msg.platform, bot=msg.bot,
            chat=msg.chat, thread=msg.thread, user=msg.user, finish=finish,
            sources=[{"kb": h.kb, "file": h.source, "heading": h.heading} for h in hits],
            tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens, latency_ms=latency_ms,
            queue_wait_ms=queue_wait_ms, **extra,
        )

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for the history writes of finished jobs."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
