"""The answer pipeline: one message in, one answer out (``dispatch``).

A command is answered by :mod:`bots.commands`; anything else is checked (size, limits), its
thread's history read, the bot's knowledge retrieved (only its own bases), the prompt built
within the context budget, the bot's tools run in rounds when offered, and the job queued
for the inference worker. The answer streams back as a :class:`~bots.answers.JobAnswer`;
when the job finishes, the exchange is appended to the thread's history (fenced by the
thread's turn) and one log line and one audit line record it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import structlog

from bots import feedback, texts, tooluse
from bots.answers import JobAnswer, TextAnswer, audit_answer, bot_of, cite_list, language
from bots.attachments import AttachmentReader, Download
from bots.commands import ChatCommands, parse_command
from bots.prompt import (
    FILE_RULES,
    BuiltPrompt,
    InputTooLong,
    PromptBuilder,
    fit_documents,
    with_documents,
    with_rules,
)
from bots.tasks import TaskRegistry
from bots.usage import QualityLog
from connectors.http_api.config import ApiConfig
from core import metrics
from core.config import DEFAULT_MODEL, NO_DOCUMENT_TEXT, BotConfig, Config, Settings
from core.dispatch import Busy, Interrupted, Rejected
from core.engines import GenerationRequest
from core.engines.base import TemplateError
from core.jobs import Job, QueueFull
from core.knowledge.index import KnowledgeIndex
from core.knowledge.retriever import Hit
from core.knowledge.thread_files import THREAD_KB
from core.lease import Fenced, Lease
from core.messages import ChatTurn, Finish, InboundMessage
from core.ratelimit import LimitExceeded
from core.redis_store import StoreUnavailable
from core.runtime import Runtime

log = structlog.get_logger("botd.service")


class AnswerPipeline:
    """``dispatch``: a message to an answer, for every platform, the API and the console."""

    def __init__(self, settings: Settings, runtime: Runtime, tasks: TaskRegistry, commands: ChatCommands) -> None:
        self.settings = settings
        self.runtime = runtime
        self.tasks = tasks
        self.commands = commands
        self._builder: PromptBuilder | None = None
        self._builders: dict[str, PromptBuilder] = {}  # the other models' ([models.NAME])
        # The thread turns held by the answers under way (request id -> lease), set by the
        # delivery: the history write is refused once a turn has moved to another daemon.
        self.turns: dict[str, Lease] = {}
        # Files, pictures and voice messages read into a turn (bots/attachments.py).
        self.attachments = AttachmentReader(runtime.thread_files)
        # Usage per bot and day, and the questions answered badly (the console's quality pages).
        self.quality = QualityLog(runtime.redis, runtime.history.prefix,
                                  lambda: runtime.retriever.embedder if runtime.retriever is not None else None,
                                  tasks.spawn)

    @property
    def cfg(self) -> Config:
        return self.settings.config

    @property
    def builder(self) -> PromptBuilder:
        tokenizer = self.runtime.tokenizer
        assert tokenizer is not None, "runtime not started"
        b = self._builder
        if b is None or b.tokenizer is not tokenizer or b.n_ctx != self.cfg.model.n_ctx:
            # A reload may have changed the model (its tokenizer) or the context size.
            b = self._builder = PromptBuilder(tokenizer, self.cfg.model.n_ctx)
        return b

    async def builder_for(self, bot: str) -> PromptBuilder:
        """The prompt builder of the model that answers ``bot`` (its tokenizer loaded once, off the loop)."""
        served = self.runtime.model_for(bot)
        if served.name == DEFAULT_MODEL:
            return self.builder
        tokenizer = await self.runtime.models.tokenizer(served.name)
        b = self._builders.get(served.name)
        if b is None or b.tokenizer is not tokenizer or b.n_ctx != served.cfg.n_ctx:
            b = self._builders[served.name] = PromptBuilder(tokenizer, served.cfg.n_ctx)
        return b

    def answered_by(self, answer: Any) -> str:
        """The name ([model] / [models.NAME] ``name``) of the model that generates ``answer``;
        "" for a fixed text (a command's answer)."""
        if not isinstance(answer, JobAnswer):
            return ""
        served = self.runtime.models.models.get(answer.job.model)
        return served.cfg.name if served is not None else ""

    async def dispatch(self, msg: InboundMessage, download: Download | None = None) -> JobAnswer | TextAnswer:
        """``msg`` answered. ``download``: how the edge fetches the message's attachments (a reply
        target's ``download``); without one they are refused as unavailable."""
        bot = bot_of(self.cfg, msg.bot)
        lang = language(self.cfg, msg)
        structlog.contextvars.bind_contextvars(request_id=msg.request_id)
        max_chars = ApiConfig.of(self.cfg).max_input_chars
        if len(msg.text) > max_chars:
            raise Rejected(
                413, "input_too_long",
                f"the message has {len(msg.text)} characters; the limit is {max_chars}",
            )
        if not msg.text.strip() and not msg.attachments:
            raise Rejected(400, "empty_message", "the message is empty")
        if msg.final_answer is not None:
            # Answered and stored before a restart, not yet shown: show the same words again.
            log.info("replaying a stored answer", platform=msg.platform, bot=msg.bot, chat=msg.chat)
            return TextAnswer(msg.final_answer, msg.request_id)
        cmd = parse_command(msg.text) if msg.history is None else None
        tool_ran = cmd is not None and cmd.runs_tool
        if cmd is not None and not tool_ran:
            return await self.commands.answer(cmd, msg, lang)

        # Counted before anything runs, tool commands included: a "/tool ... -- question" that
        # is refused here has called no tool.
        if not msg.resumed:  # a replayed message was admitted (and counted) before the restart
            try:
                await self.runtime.limits.admit(msg)
            except LimitExceeded as exc:
                metrics.MESSAGES.labels(msg.platform, "rate_limited").inc()
                log.info("rate limited", platform=msg.platform, user=msg.user, chat=msg.chat)
                told = exc.message if lang == "en" else texts.say(
                    "RATE_LIMITED", lang, wait=texts.wait_text(exc.retry_after, lang), detail=exc.message)
                raise Busy(exc.message, exc.retry_after, per_user=True, user_message=told) from None
        if tool_ran:
            assert cmd is not None
            outcome = await self.commands.run_tool(cmd, msg, lang)
            if isinstance(outcome, TextAnswer):
                return outcome
            msg.text = outcome  # "/tool NAME ARGS -- QUESTION": the model answers from the result

        # Files, pictures, voice: read into the turn (or answered: a refusal, a file's acknowledgement).
        pinned: list[Hit] = []
        note = ""
        if msg.attachments and msg.history is None and msg.messages is None:
            intake = await self.attachments.take(msg, bot, self.cfg, lang, download)
            fixed = intake.reply(bot.summarise_files)
            if fixed is not None:
                audit_answer(self.runtime, msg, fixed, "attachments", files=[f.name for f in intake.files])
                return TextAnswer(fixed, msg.request_id)
            note = intake.note
            if intake.summarise():
                # No question: the model sums the files up from their opening chunks.
                pinned = intake.opening()
                note = intake.acknowledgement() + "\n\n"
                msg.text = "\n".join([*(f"📎 {f.name}" for f in intake.files), texts.say("FILE_SUMMARY_ASK", lang)])
            else:
                msg.text = intake.text
        # The files sent in this thread: searched with the bot's bases, for this thread's turns only.
        files: KnowledgeIndex | None = None
        if msg.history is None and msg.messages is None:
            try:
                files = await self.runtime.thread_files.index(msg.thread_key)
            except StoreUnavailable:
                log.warning("the thread's files are unavailable; answering without them", thread=str(msg.thread_key))

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

        model = self.cfg.named_model(bot.model)  # [model], or the bot's [models.NAME]
        builder = await self.builder_for(msg.bot)
        budget = msg.max_tokens or bot.max_tokens or model.max_tokens
        system = msg.system if msg.system is not None else bot.system_prompt
        if bot.knowledge:
            system = with_rules(system)
        elif files is not None or pinned:
            system = with_rules(system, FILE_RULES)
        loop = asyncio.get_running_loop()
        hits: list[Hit] = pinned
        if (bot.knowledge or files is not None) and not pinned:
            found = await self._knowledge(bot, msg, lang, files)
            if isinstance(found, TextAnswer):
                return found
            hits = found
        # The bot's own tools, offered for this message (never to a client that brings its own).
        offered = [] if msg.tools is not None or msg.messages is not None or tool_ran else \
            tooluse.offered(bot, msg.text, self.runtime.tools)
        try:
            if msg.messages is not None:
                built, hits = await loop.run_in_executor(
                    None, self._given, system, hits, msg.messages, budget, msg.tools, builder)
            else:
                built, hits = await loop.run_in_executor(
                    None, self._build, system, hits, history, msg.text, budget, offered or None, builder)
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
            adapters=tuple((a.path, a.scale) for a in bot.lora),  # the bot's LoRA adapters, its requests only
        )
        if msg.tools:
            try:
                grammar, lazy = await tooluse.choice_grammar(msg.tools, msg.tool_choice)
            except ValueError as exc:  # the HTTP API refuses these first (core/schema_limits.py)
                raise Rejected(400, "invalid_request", f"tools: {exc}") from None
            request = replace(request, tools=msg.tools, grammar=grammar, grammar_lazy=lazy)
        job: Job | None = None
        if offered:
            assert self.runtime.tools is not None
            rounds = await tooluse.run_rounds(
                request, offered, bot=bot, box=self.runtime.tools, user=f"{msg.platform}:{msg.user}",
                bot_name=msg.bot, choice=bot.tool_choice, run_job=lambda r: self.run_round(msg, r))
            if rounds.used:
                note += texts.say("TOOLS_USED", lang, names=", ".join(dict.fromkeys(rounds.used)))
            # The model answered in prose (its finished job replays at once), or, after its calls,
            # answers from their results in one more, streamed, turn without tools.
            job = rounds.job if rounds.finished else None
            request = replace(request, messages=rounds.messages)
        if job is None:
            job = self._job(msg, request)
            self._submit(msg, job)
        # The question as the model was given it (with its documents) is what the history keeps.
        shown = built.messages[-1]["content"] if msg.messages is None else None
        task = self.tasks.spawn(self._complete(msg, job, built.history_used, built.history_dropped, degraded, hits,
                                               shown))
        return JobAnswer(job, self.runtime, task, hits, lang, note)

    async def _knowledge(self, bot: BotConfig, msg: InboundMessage, lang: texts.Lang,
                         files: KnowledgeIndex | None = None) -> list[Hit] | TextAnswer:
        """The chunks of the bot's own bases (and of the thread's ``files``) for ``msg``; the
        bot's refusal when none matches and it says so; :class:`Busy` while a base is still loading."""
        # A base still being read or built must not look like a base without the answer.
        loading = await self.runtime.wait_knowledge(list(bot.knowledge), self.cfg.queue.max_wait_s)
        if loading:
            retry = self.cfg.queue.retry_after_s
            metrics.MESSAGES.labels(msg.platform, "busy").inc()
            log.info("knowledge still loading; answered busy", bot=msg.bot, knowledge=loading)
            raise Busy(f"the knowledge base {', '.join(loading)} is still loading", retry,
                       user_message=texts.say("KNOWLEDGE_LOADING", lang, s=retry))
        hits = await self._retrieve(bot, msg, files)
        if files is not None:
            # The first question after a file is most likely about it ("what is this about?" shares
            # no words with it): given the file's opening when nothing of the files matched it.
            try:
                opening = await self.runtime.thread_files.unasked(msg.thread_key)
            except StoreUnavailable:
                opening = []
            if opening and not any(h.kb == THREAD_KB for h in hits):
                hits = [*opening, *hits]
        if not hits and bot.knowledge and bot.no_match == "refuse":
            metrics.MESSAGES.labels(msg.platform, "no_document").inc()
            log.info("no relevant document; answered so", platform=msg.platform, bot=msg.bot,
                     knowledge=bot.knowledge)
            # The admin's own refusal as written; the default one in the message's language.
            refusal = bot.no_match_text if bot.no_match_text != NO_DOCUMENT_TEXT or lang == "en" \
                else texts.say("NO_DOCUMENT", lang)
            audit_answer(self.runtime, msg, refusal, "no_document", knowledge=bot.knowledge)
            self.tasks.spawn(self.quality.refused(msg.platform, msg.bot, bot.knowledge, msg.text))
            return TextAnswer(refusal, msg.request_id)
        return hits

    def _job(self, msg: InboundMessage, request: GenerationRequest) -> Job:
        return Job(
            user=msg.quota_key,  # the queue's fairness and per-user cap: the authenticated identity
            request=request,
            keep_thinking=self.cfg.named_model(bot_of(self.cfg, msg.bot).model).keep_thinking,
            timeout_s=self.cfg.queue.job_timeout_s,
            id=msg.request_id,
            replayed=msg.resumed,
        )

    def _submit(self, msg: InboundMessage, job: Job) -> None:
        """Queue ``job`` (:class:`Busy` when the queue is full, :class:`Interrupted` when stopping)."""
        if msg.durable and not self.runtime.worker.accepting:
            # Shutting down: a recorded message stays in the inbox for the next start, unanswered now.
            raise Interrupted(msg.request_id)
        try:
            # Replayed messages were accepted before the restart: they take their place regardless of bounds.
            self.runtime.models.submit(self.runtime.model_for(msg.bot).name, job, force=msg.resumed)
        except QueueFull as exc:
            metrics.MESSAGES.labels(msg.platform, "busy").inc()
            log.info("queue full", platform=msg.platform, user=msg.user, reason=exc.reason)
            raise Busy(exc.reason, exc.retry_after, exc.per_user) from None
        metrics.QUEUE_DEPTH.set(self.runtime.models.queue_depth())

    async def run_round(self, msg: InboundMessage, request: GenerationRequest) -> Job:
        """One round of tool calls: queued like any answer, waited for, never shown."""
        job = self._job(msg, request)
        self._submit(msg, job)
        try:
            await job.wait()
        finally:
            if not job.done:  # the message was cancelled while the model was deciding
                self.runtime.models.cancel(job)
        return job

    async def _retrieve(self, bot: BotConfig, msg: InboundMessage, files: KnowledgeIndex | None = None) -> list[Hit]:
        retriever = self.runtime.retriever
        if retriever is None and files is not None:
            retriever = self.runtime.thread_files.retriever()  # no base configured: the files alone
        if retriever is None:
            return []
        t0 = time.monotonic()
        # Only the bot's own grants, from the config: the message cannot name another base. The
        # thread's own files (its key is the message's thread) rank together with them.
        hits = await asyncio.get_running_loop().run_in_executor(
            None, retriever.search, list(bot.knowledge), msg.text, [files] if files is not None else [])
        metrics.RETRIEVAL.observe(time.monotonic() - t0)
        return hits

    def _build(self, system: str | None, hits: list[Hit], history: list[ChatTurn], text: str,
               budget: int, tools: list[dict[str, Any]] | None = None,
               builder: PromptBuilder | None = None) -> tuple[BuiltPrompt, list[Hit]]:
        """The prompt, with as many retrieved chunks as fit ``[retrieval] context_tokens`` in the
        user's turn (blocking)."""
        builder = builder or self.builder
        used = fit_documents(builder.tokenizer, hits, self.cfg.retrieval.context_tokens)
        return builder.build(system, history, with_documents(text, used), budget, tools), used

    def _given(self, system: str | None, hits: list[Hit], messages: list[dict[str, Any]], budget: int,
               tools: list[dict[str, Any]] | None, builder: PromptBuilder) -> tuple[BuiltPrompt, list[Hit]]:
        """A client's own conversation, with the retrieved chunks in its last turn when that is
        the user's question; otherwise none are given, and so none are cited (blocking)."""
        last = messages[-1] if messages else {}
        used: list[Hit] = []
        if hits and last.get("role") == "user" and isinstance(last.get("content"), str):
            used = fit_documents(builder.tokenizer, hits, self.cfg.retrieval.context_tokens)
            messages = [*messages[:-1], {**last, "content": with_documents(last["content"], used)}]
        return builder.given(system, messages, budget, tools), used

    async def _complete(self, msg: InboundMessage, job: Job, used: int, dropped: int, degraded: bool,
                        hits: Sequence[Hit] = (), shown: str | None = None) -> None:
        structlog.contextvars.bind_contextvars(request_id=msg.request_id, job_id=job.id)
        t0 = time.monotonic()
        reason = await job.wait()
        stored = False
        if Finish(reason).complete and msg.history is None and job.text.strip():
            try:
                await self.runtime.history.append_exchange(
                    msg.thread_key, msg.text, job.history_text(),
                    also=lambda pipe: self.runtime.inbox.add_answer(pipe, msg, job.text),
                    fence=self.turns.get(msg.request_id), user_shown=shown,
                )
                stored = True
            except StoreUnavailable:
                log.warning("could not store the exchange: redis unreachable", thread=str(msg.thread_key))
            except Fenced:
                log.warning("the thread's turn moved to another daemon (this one paused past its lease): "
                            "the exchange is not stored", thread=str(msg.thread_key))
        metrics.MESSAGES.labels(msg.platform, reason).inc()
        await self.runtime.limits.spend(msg, job.usage.total_tokens)
        started = job.started_at or job.finished_at or t0
        latency = (job.finished_at or time.monotonic()) - job.enqueued_at
        decode_s = (job.finished_at or 0) - (job.first_token_at or 0)
        audit_answer(self.runtime, msg, job.text, reason, hits, job.usage, latency_ms=round(latency * 1000),
                     queue_wait_ms=round((started - job.enqueued_at) * 1000))
        sims = [h.similarity for h in hits if h.similarity is not None]
        retriever = self.runtime.retriever
        # In the background: a slow or unreachable Redis never holds up the answer's end.
        self.tasks.spawn(self.quality.answered(
            msg.platform, msg.bot, bot_of(self.cfg, msg.bot).knowledge if msg.bot in self.cfg.bots else [], msg.text,
            msg.request_id, complete=Finish(reason).complete, tokens_in=job.usage.prompt_tokens,
            tokens_out=job.usage.completion_tokens,
            ttft_ms=None if job.first_token_at is None else (job.first_token_at - started) * 1000,
            wait_ms=(started - job.enqueued_at) * 1000, best_similarity=max(sims) if sims else None,
            cut=retriever.threshold(msg.text) if retriever is not None else None, given=len(hits)))
        log.info(
            "answered" if reason in (Finish.STOP, Finish.LENGTH) else f"finished: {reason}",
            platform=msg.platform, bot=msg.bot, model=job.model, chat=msg.chat, thread=msg.thread, user=msg.user,
            finish=reason, latency_ms=round(latency * 1000), queue_wait_ms=round((started - job.enqueued_at) * 1000),
            ttft_ms=round(((job.first_token_at or started) - started) * 1000),
            tokens_in=job.usage.prompt_tokens, tokens_cached=job.cached_tokens, tokens_out=job.usage.completion_tokens,
            tokens_per_s=round((job.usage.completion_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
            history_used=used, history_dropped=dropped, history_stored=stored, degraded=degraded,
            sources=cite_list(hits),
        )
        if Finish(reason).complete and job.text.strip():
            # Kept for the 👍 / 👎 under the answer, before the client hears the answer is over.
            served = self.runtime.models.models.get(job.model)
            await feedback.record(self.runtime, self.cfg, msg, job, hits, round(latency * 1000), str(reason),
                                  served.cfg.name if served is not None else job.model)
