"""The chat service: the one entry of every platform message, and of every API request.

``receive(message, target)`` takes a platform message: it is recorded durably (platform
retries dropped in the same step), routed to a bot, checked against the account's
allow-lists and answered in a background task, streamed into the reply target; the
record is cleared once the platform has the final answer. ``dispatch(message)`` is the
request/response path under it: a command's answer, or the thread's history and the
bot's knowledge built into a prompt within the context budget, queued for the
inference worker and returned as an answer to stream. When the job finishes, the
exchange is appended to the thread's history and one log line records latency, tokens
and queue wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

import structlog

from bots import texts, tooluse
from bots.prompt import BuiltPrompt, InputTooLong, PromptBuilder, fit_documents, with_documents, with_rules
from bots.streaming import Delivery
from connectors.base import Connector
from connectors.reply import ReplyTarget
from core import metrics
from core.commands import parse_command
from core.config import DEFAULT_MODEL, NO_DOCUMENT_TEXT, BotConfig, Config, Settings
from core.dispatch import Busy, Interrupted, Rejected
from core.engines import GenerationRequest
from core.engines.base import TemplateError
from core.inbox import NotOwned
from core.jobs import Job, QueueFull
from core.knowledge.retriever import Hit
from core.lease import Fenced, Lease, turn
from core.messages import ChatTurn, Finish, InboundMessage, ReplyEvent, ThreadKey, Usage
from core.ratelimit import LimitExceeded
from core.redis_store import StoreUnavailable
from core.routing import route
from core.runtime import Runtime
from core.tools import ToolError

log = structlog.get_logger("botd.service")


class JobAnswer:
    """An answer produced by the inference worker; ``hits`` are the documents it was given."""

    def __init__(self, job: Job, service: ChatService, completion: asyncio.Task[None],
                 hits: Sequence[Hit] = (), lang: texts.Lang = "both", note: str = "") -> None:
        self.job = job
        self.id = job.id
        self.hits = list(hits)
        self.lang = lang
        # Shown before the answer, never stored with it (which tools ran).
        self.note = note
        self._service = service
        self._completion = completion

    async def events(self) -> AsyncIterator[ReplyEvent]:
        if self.note:
            yield ReplyEvent(delta=self.note)
        async for ev in self.job.events():
            if ev.done:
                if self.note:
                    ev = replace(ev, text=self.note + ev.text)
                # The exchange is in the history before the client hears the answer is over,
                # so an immediate next turn always sees it.
                await asyncio.shield(self._completion)
                stopped = ev.finish_reason in (Finish.STOP, Finish.LENGTH)
                footer = sources_footer(self.hits, self.lang) if stopped else ""
                if footer and ev.text.strip():
                    # Cited by botd, not by the model: the sources are exactly the chunks it was given.
                    yield ReplyEvent(delta=footer)
                    ev = replace(ev, text=ev.text + footer, sources=tuple(cite_list(self.hits)))
            yield ev

    def cancel(self) -> None:
        if not self.job.done:
            self._service.runtime.models.cancel(self.job)


def cite_list(hits: Sequence[Hit]) -> list[str]:
    """Each cited (file › heading) once, in order of relevance."""
    return list(dict.fromkeys(h.cite for h in hits))


def sources_footer(hits: Sequence[Hit], lang: texts.Lang = "both") -> str:
    # Plain text on purpose: it reads the same on Telegram, Slack, WeCom and in the API.
    return texts.say("SOURCES", lang, cites="; ".join(cite_list(hits))) if hits else ""


class TextAnswer:
    """A fixed answer (a command's reply): one delta and the end."""

    def __init__(self, text: str, request_id: str) -> None:
        self.id = request_id
        self.text = text

    async def events(self) -> AsyncIterator[ReplyEvent]:
        yield ReplyEvent(delta=self.text)
        yield ReplyEvent(finish_reason=Finish.STOP, text=self.text, usage=Usage())

    def cancel(self) -> None:
        pass


class ChatService:
    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self._builder: PromptBuilder | None = None
        self._builders: dict[str, PromptBuilder] = {}  # the other models' ([models.NAME])
        # Every task under way (platform answers, history writes, ingests): one registry, each
        # with the connector it answers through ("" for none).
        self._tasks: dict[asyncio.Task[Any], str] = {}
        # The thread turns held by the answers under way (request id -> lease): the history
        # write is refused once a turn has moved to another daemon.
        self._turns: dict[str, Lease] = {}
        # Set by the daemon: re-ingest one knowledge base (the admins' "/kb ingest").
        self.ingest_hook: Callable[[str], Awaitable[Any]] | None = None
        # Set by the daemon: reload config.toml as SIGHUP does (the console's "Reload"); returns
        # the reload's task (True: applied), or None when none could start.
        self.reload_hook: Callable[[], Awaitable[bool] | None] | None = None

    @property
    def cfg(self) -> Config:
        return self.settings.config

    @property
    def model_name(self) -> str:
        return self.cfg.model.name

    @property
    def n_ctx(self) -> int:
        return self.cfg.model.n_ctx

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

    def bot_names(self) -> list[str]:
        return sorted(self.cfg.bots)

    def answered_by(self, answer: Any) -> str:
        """The name ([model] / [models.NAME] ``name``) of the model that generates ``answer``;
        "" for a fixed text (a command's answer)."""
        if not isinstance(answer, JobAnswer):
            return ""
        served = self.runtime.models.models.get(answer.job.model)
        return served.cfg.name if served is not None else ""

    def health(self) -> dict[str, Any]:
        return self.runtime.health()

    # -- platform messages: receive, answer, resume ---------------------------------------

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
        self._spawn(self._answer(msg, target), account.connector)
        return True

    async def resume(self, connectors: dict[str, Connector]) -> None:
        """Answer what an earlier run accepted but did not deliver (crash, kill -9, SIGTERM)."""
        try:
            pending = await self.runtime.inbox.pending()
        except StoreUnavailable:
            log.warning("cannot read the durable inbox: redis unreachable; earlier messages wait for the next start")
            return
        await self._take_over(pending, connectors, "answering messages accepted before the restart")

    async def serve(self, connectors: dict[str, Connector], stop: asyncio.Event) -> None:
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

    async def _take_over(self, pending: list[tuple[str, InboundMessage]], connectors: dict[str, Connector],
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
            self._spawn(self._answer(msg, target), name)
        if counts:
            log.info(event, counts=counts)

    async def _answer(self, msg: InboundMessage, target: ReplyTarget) -> None:
        structlog.contextvars.bind_contextvars(platform=msg.platform, bot=msg.bot, chat=msg.chat,
                                               request_id=msg.request_id)
        # The language of every text botd says about this message: decided once, here.
        lang = self.language(msg)
        delivery = Delivery(msg, target, self.runtime.inbox, lang)
        try:
            if not await self._admitted(msg, target):
                log.info("user not allowed", user=msg.user)
                await delivery.show(texts.say("NOT_ALLOWED", lang))
            elif not msg.readable:
                await delivery.show(texts.say("NOT_TEXT", lang))
            else:
                # One answer at a time per thread, across daemons: the next message of the thread
                # waits, and its prompt holds this exchange.
                async with turn(self.runtime.redis, self.cfg.redis.key_prefix, f"thread:{msg.thread_key}",
                                self.cfg.redis.lease_s, self.cfg.server.instance_name()) as lease:
                    if lease is not None:
                        self._turns[msg.request_id] = lease
                    typing = asyncio.create_task(self._typing(target)) if target.typing_every_s else None
                    try:
                        await self._reply(msg, delivery)
                    finally:
                        self._turns.pop(msg.request_id, None)
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
            answer = await self.dispatch(msg)
        except Busy as exc:
            await delivery.show(exc.user_message or texts.say("BUSY", delivery.lang, s=exc.retry_after))
            return ""
        except Rejected as exc:
            await delivery.show(exc.message)
            return ""
        try:
            return await delivery.stream(answer)
        finally:
            answer.cancel()  # a no-op once finished; stops the generation if showing failed

    @staticmethod
    async def _typing(target: ReplyTarget) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                with contextlib.suppress(Exception):
                    await target.typing()
                await asyncio.sleep(target.typing_every_s or 5)

    # -- request/response ---------------------------------------------------------------------

    async def reset(self, thread: ThreadKey, lang: texts.Lang = "both") -> bool:
        try:
            return await self.runtime.history.reset(thread)
        except StoreUnavailable as exc:
            raise Busy("history storage is unreachable; try again shortly", self.cfg.queue.retry_after_s,
                       user_message=texts.say("STORE_DOWN", lang)) from exc

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

    def language(self, msg: InboundMessage) -> texts.Lang:
        """The language botd's own texts take for ``msg``: the bot's ``language``, or with "auto"
        the message's (Chinese characters: zh, else en; nothing to judge: both)."""
        bot = self.cfg.bots.get(msg.bot)
        return texts.language(bot.language if bot is not None else "auto", msg.text if msg.readable else "")

    async def dispatch(self, msg: InboundMessage) -> JobAnswer | TextAnswer:
        bot = self._bot(msg.bot)
        lang = self.language(msg)
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
        cmd = parse_command(msg.text) if msg.history is None else None
        tool_ran = cmd is not None and cmd.name in ("calc", "tool")
        if cmd is not None and not tool_ran:
            return await self._command(cmd.name, msg, cmd.args, lang)

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
            outcome = await self._tool_command(cmd.name, msg, cmd.args, lang)
            if isinstance(outcome, TextAnswer):
                return outcome
            msg.text = outcome  # "/tool NAME ARGS -- QUESTION": the model answers from the result

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
                           user_message=texts.say("KNOWLEDGE_LOADING", lang, s=retry))
            hits = await self._retrieve(bot, msg)
            if not hits and bot.no_match == "refuse":
                metrics.MESSAGES.labels(msg.platform, "no_document").inc()
                log.info("no relevant document; answered so", platform=msg.platform, bot=msg.bot,
                         knowledge=bot.knowledge)
                # The admin's own refusal as written; the default one in the message's language.
                refusal = bot.no_match_text if bot.no_match_text != NO_DOCUMENT_TEXT or lang == "en" \
                    else texts.say("NO_DOCUMENT", lang)
                self._audit(msg, refusal, "no_document", knowledge=bot.knowledge)
                return TextAnswer(refusal, msg.request_id)
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
        note = ""
        job: Job | None = None
        if offered:
            assert self.runtime.tools is not None
            rounds = await tooluse.run_rounds(
                request, offered, bot=bot, box=self.runtime.tools, user=f"{msg.platform}:{msg.user}",
                bot_name=msg.bot, choice=bot.tool_choice, run_job=lambda r: self._run_round(msg, r))
            if rounds.used:
                note = texts.say("TOOLS_USED", lang, names=", ".join(dict.fromkeys(rounds.used)))
            # The model answered in prose (its finished job replays at once), or, after its calls,
            # answers from their results in one more, streamed, turn without tools.
            job = rounds.job if rounds.finished else None
            request = replace(request, messages=rounds.messages)
        if job is None:
            job = self._job(msg, request)
            self._submit(msg, job)
        # The question as the model was given it (with its documents) is what the history keeps.
        shown = built.messages[-1]["content"] if msg.messages is None else None
        task = self._spawn(self._complete(msg, job, built.history_used, built.history_dropped, degraded, hits,
                                          shown))
        return JobAnswer(job, self, task, hits, lang, note)

    def _job(self, msg: InboundMessage, request: GenerationRequest) -> Job:
        return Job(
            user=msg.quota_key,  # the queue's fairness and per-user cap: the authenticated identity
            request=request,
            keep_thinking=self.cfg.named_model(self._bot(msg.bot).model).keep_thinking,
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

    async def _run_round(self, msg: InboundMessage, request: GenerationRequest) -> Job:
        """One round of tool calls: queued like any answer, waited for, never shown."""
        job = self._job(msg, request)
        self._submit(msg, job)
        try:
            await job.wait()
        finally:
            if not job.done:  # the message was cancelled while the model was deciding
                self.runtime.models.cancel(job)
        return job

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

    async def _command(self, name: str, msg: InboundMessage, args: str = "", lang: texts.Lang = "both") -> TextAnswer:
        if name == "kb":
            text = await self._kb_command(msg, args, lang)
        elif name == "reset":
            text = texts.say("RESET_DONE" if await self.reset(msg.thread_key, lang) else "RESET_NOTHING", lang)
        else:
            text = texts.say("HELP", lang, bot=msg.bot)
            if msg.platform in texts.PLATFORM_HELP:
                text += "\n\n" + texts.say(texts.PLATFORM_HELP[msg.platform], lang)
        metrics.MESSAGES.labels(msg.platform, f"command_{name}").inc()
        log.info("command", command=name, platform=msg.platform, bot=msg.bot, chat=msg.chat, user=msg.user)
        return TextAnswer(text, msg.request_id)

    async def _tool_command(self, name: str, msg: InboundMessage, args: str, lang: texts.Lang) -> TextAnswer | str:
        """``/calc EXPR`` and ``/tool NAME ARGS``: the tool's result is the answer; with
        `` -- QUESTION`` after the arguments, the question and the result go to the model (the
        text returned). Only the bot's own tools run."""
        bot, box = self._bot(msg.bot), self.runtime.tools
        # The names the bot's tools are called by (an MCP section grants each allowed tool).
        granted = box.function_names(bot.tools) if box is not None else []
        if name == "calc":
            calcs = [t for t in bot.tools if t in granted and self.cfg.tools[t].type == "calculator"]
            if not calcs:
                return TextAnswer(texts.say("CALC_NONE", lang), msg.request_id)
            if not args:
                return TextAnswer(texts.say("CALC_USAGE", lang), msg.request_id)
            tool, rest, question = calcs[0], args, ""
        else:
            tool, rest, question = tooluse.parse_tool_command(args)
            if not granted:
                return TextAnswer(texts.say("TOOL_NO_TOOLS", lang), msg.request_id)
            if not tool:
                return TextAnswer(texts.say("TOOL_USAGE", lang, names=", ".join(granted)), msg.request_id)
            if tool not in granted:
                return TextAnswer(texts.say("TOOL_NONE", lang, name=tool, names=", ".join(granted)), msg.request_id)
        assert box is not None
        try:
            arguments = box.parse_command(tool, rest)
        except ToolError as exc:
            return TextAnswer(texts.say("TOOL_FAILED", lang, tool=tool, reason=exc.reason), msg.request_id)
        try:
            # One of the user's few places for a running tool call (a burst is refused, not queued).
            with self.runtime.limits.tool_call(msg):
                result = await box.call(tool, arguments, bot=msg.bot, user=f"{msg.platform}:{msg.user}",
                                        allowed=bot.tools)
        except LimitExceeded as exc:
            metrics.MESSAGES.labels(msg.platform, "rate_limited").inc()
            log.info("tool calls at the user's cap", platform=msg.platform, user=msg.user, tool=tool)
            raise Busy(exc.message, exc.retry_after, per_user=True, user_message=texts.say(
                "TOOL_BUSY", lang, n=self.cfg.limits.user_tool_calls_in_flight)) from None
        metrics.MESSAGES.labels(msg.platform, f"command_{name}").inc()
        if question:
            return f"{question}\n\n[{tool}]\n{result.text}"
        self._audit(msg, result.text, "tool" if result.ok else "tool_error", tool=tool)
        told = result.text if result.ok else texts.say("TOOL_FAILED", lang, tool=tool, reason=result.error)
        return TextAnswer(told, msg.request_id)

    async def _kb_command(self, msg: InboundMessage, args: str, lang: texts.Lang = "both") -> str:
        bot = self._bot(msg.bot)
        who = f"{msg.platform}:{msg.user}"
        if who not in bot.admins:
            log.warning("knowledge admin command refused", who=who, bot=msg.bot, command=args)
            return texts.say("KB_ADMINS_ONLY", lang)
        action = args.split()[0].lower() if args.split() else ""
        if not bot.knowledge:
            return texts.say("KB_NONE", lang)
        if action == "sources":
            retriever = self.runtime.retriever
            lines = []
            for kb in bot.knowledge:
                # Counting 100k chunks is CPU work: off the event loop.
                files = await asyncio.to_thread(retriever.sources, kb) if retriever is not None else {}
                lines.append(texts.say("KB_SOURCES_LINE", lang, kb=kb, files=len(files), chunks=sum(files.values())))
                lines += [texts.say("KB_SOURCE_ITEM", lang, src=src, n=n) for src, n in sorted(files.items())]
            return "\n".join(lines)
        if action == "ingest":
            if self.ingest_hook is None:
                return texts.say("KB_NO_INGEST", lang)
            for kb in bot.knowledge:
                self._spawn(self.ingest_hook(kb))
            log.info("knowledge re-ingest requested", who=who, knowledge=bot.knowledge)
            return texts.say("KB_INGEST_STARTED", lang, kbs=", ".join(bot.knowledge))
        return texts.say("KB_HELP", lang)

    def _spawn(self, coro: Any, connector: str = "") -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks[task] = connector
        task.add_done_callback(self._tasks.pop)
        return task

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
                    fence=self._turns.get(msg.request_id), user_shown=shown,
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
        self._audit(msg, job.text, reason, hits, job.usage, latency_ms=round(latency * 1000),
                    queue_wait_ms=round((started - job.enqueued_at) * 1000))
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
        """Wait (bounded) for the answers under way and the history writes of finished jobs."""
        await self._wait(list(self._tasks), timeout_s)

    async def drain_connector(self, connector: str, timeout_s: float) -> None:
        """Wait (bounded) for the answers going out through ``connector``."""
        await self._wait([t for t, c in self._tasks.items() if c == connector], timeout_s)

    @staticmethod
    async def _wait(tasks: list[asyncio.Task[Any]], timeout_s: float) -> None:
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()

    # -- the web console: what it reads and steers ---------------------------------------------
    # Each takes the bots the asking user may see; the console decides who that is.

    async def conversations(self, bots: Collection[str], platform: str | None = None,
                            limit: int = 500) -> list[dict[str, Any]]:
        """The threads with a history in Redis for ``bots`` (newest first): platform, bot, chat,
        thread, messages, last message time, seconds until they expire."""
        redis, prefix = self.runtime.redis, f"{self.runtime.history.prefix}:hist:"
        wanted = set(bots)

        async def scan() -> list[tuple[str, ThreadKey]]:
            found: list[tuple[str, ThreadKey]] = []
            seen = 0
            async for key in redis.client.scan_iter(match=prefix + "*", count=1000):
                seen += 1
                thread = self.thread_of(key[len(prefix):])
                if thread is not None and thread.bot in wanted and (not platform or thread.platform == platform):
                    found.append((key, thread))
                if seen >= 50_000 or len(found) >= 5 * limit:  # a bounded look, not a full walk
                    break
            return found

        async def details(keys: list[str]) -> list[Any]:
            async with redis.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                    pipe.lindex(key, -1)
                    pipe.ttl(key)
                return list(await pipe.execute())

        try:
            found = await redis.run("SCAN", scan)
            values = await redis.run("LLEN", details, [k for k, _ in found]) if found else []
        except StoreUnavailable as exc:
            raise Busy("history storage is unreachable; try again shortly", self.cfg.queue.retry_after_s) from exc
        out = []
        for i, (_key, t) in enumerate(found):
            length, last, ttl = values[3 * i: 3 * i + 3]
            if not length:
                continue
            try:
                ts = float(json.loads(last).get("ts", 0)) if last else None
            except (ValueError, AttributeError, TypeError):
                ts = None
            out.append({"id": t.redis_suffix(), "platform": t.platform, "bot": t.bot, "chat": t.chat,
                        "thread": t.thread, "messages": int(length), "last_ts": ts,
                        "expires_in_s": int(ttl) if ttl and int(ttl) >= 0 else None})
        out.sort(key=lambda c: -(c["last_ts"] or 0))
        return out[:limit]

    async def conversation(self, thread: ThreadKey) -> list[dict[str, Any]]:
        """One thread's stored messages, oldest first, with their times."""
        redis = self.runtime.redis
        try:
            raw = await redis.run("LRANGE", redis.client.lrange, self.runtime.history.key(thread), 0, -1)
        except StoreUnavailable as exc:
            raise Busy("history storage is unreachable; try again shortly", self.cfg.queue.retry_after_s) from exc
        out = []
        for item in raw:
            try:
                d = json.loads(item)
                if d.get("role") in ("user", "assistant") and isinstance(d.get("content"), str):
                    out.append({"role": d["role"], "content": d["content"], "ts": d.get("ts")})
            except (ValueError, AttributeError):
                continue
        return out

    async def knowledge_status(self, bots: Collection[str]) -> list[dict[str, Any]]:
        """The knowledge bases granted to ``bots``: state, documents and chunk counts of the live
        index, when it was built, and the console's last re-ingest of it."""
        granted: dict[str, list[str]] = {}
        for name in sorted(bots):
            bot = self.cfg.bots.get(name)
            for kb in bot.knowledge if bot is not None else []:
                granted.setdefault(kb, []).append(name)
        state_dir = self.cfg.server.state_dir

        def manifest(kb: str) -> dict[str, Any]:
            from core.knowledge.store import KnowledgeStore

            store = KnowledgeStore(state_dir, kb)
            version = store.current_name()
            if version is None:
                return {}
            try:
                return dict(json.loads((store.dir / version / "manifest.json").read_text(encoding="utf-8")))
            except (OSError, ValueError):
                return {}

        out = []
        for kb in sorted(granted):
            if kb not in self.cfg.knowledge:
                continue
            m = await asyncio.to_thread(manifest, kb)
            files = m.get("files") or {}
            run = self._console_ingests.get(kb, {})
            out.append({
                "name": kb, "bots": granted[kb], "paths": list(self.cfg.knowledge[kb].paths),
                "state": "ingesting" if run.get("running") else self.runtime.knowledge_state.get(kb, "unknown"),
                "chunks": sum(int(f.get("count", 0)) for f in files.values()),
                "documents": [{"source": s, "chunks": int(f.get("count", 0))} for s, f in sorted(files.items())],
                "built_at": m.get("built_at") or None, "model": m.get("model", ""),
                "last_ingest": {k: v for k, v in run.items() if k != "running"} or None,
                "schedule": self.cfg.knowledge[kb].schedule,
            })
        return out

    @property
    def _console_ingests(self) -> dict[str, dict[str, Any]]:
        runs: dict[str, dict[str, Any]] | None = self.__dict__.get("_console_ingest_runs")
        if runs is None:
            runs = self.__dict__["_console_ingest_runs"] = {}
        return runs

    def reingest(self, kb: str) -> bool:
        """Start re-ingesting ``kb`` in the background; False when one is already running (or none can)."""
        runs = self._console_ingests
        if self.ingest_hook is None or kb not in self.cfg.knowledge or runs.get(kb, {}).get("running"):
            return False
        hook = self.ingest_hook
        runs[kb] = {"running": True, "started_at": time.time()}

        async def run() -> None:
            report: Any = None
            try:
                report = await hook(kb)
            finally:
                runs[kb] = {"started_at": runs[kb]["started_at"], "finished_at": time.time(),
                            "ok": report is not None,
                            "summary": report.summary() if report is not None else "failed or already running; "
                                                                                   "see the daemon's log",
                            "skipped": [list(s) for s in report.skipped] if report is not None else []}

        self._spawn(run())
        return True

    @staticmethod
    def answer_details(answer: Any) -> dict[str, Any]:
        """Timings and token counts of a finished answer (empty for a fixed text)."""
        if not isinstance(answer, JobAnswer):
            return {}
        job = answer.job
        started = job.started_at or job.enqueued_at
        decode_s = (job.finished_at or 0) - (job.first_token_at or 0)
        return {
            "queue_wait_ms": round((started - job.enqueued_at) * 1000),
            "ttft_ms": round(((job.first_token_at or started) - started) * 1000),
            "total_ms": round(((job.finished_at or time.monotonic()) - job.enqueued_at) * 1000),
            "tokens_per_s": round((job.usage.completion_tokens - 1) / decode_s, 1)
            if decode_s > 0 and job.usage.completion_tokens > 1 else None,
            "prompt_tokens": job.usage.prompt_tokens,
            "prompt_tokens_reused": job.cached_tokens,
            "completion_tokens": job.usage.completion_tokens,
            "sources": [{"kb": h.kb, "cite": h.cite, "score": round(h.score, 4),
                         "similarity": None if h.similarity is None else round(h.similarity, 3)}
                        for h in answer.hits],
        }

    async def audit_tail(self, bots: Collection[str] | None, *, user: str = "", day: str = "",
                         limit: int = 200, max_bytes: int = 2_000_000) -> list[dict[str, Any]] | None:
        """The newest audit lines (newest first) about ``bots`` (None: every line, console actions
        included), filtered by user (part of it) and day ("YYYY-MM-DD"); None without an audit log."""
        path = self.cfg.audit.file
        if not path:
            return None

        def tail() -> list[str]:
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    f.seek(max(0, size - max_bytes))
                    data = f.read()
            except FileNotFoundError:
                return []
            lines = data.decode("utf-8", errors="replace").splitlines()
            return lines[1:] if size > max_bytes else lines  # the first may be cut

        out: list[dict[str, Any]] = []
        wanted = None if bots is None else set(bots)
        for line in reversed(await asyncio.to_thread(tail)):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            if wanted is not None and entry.get("bot") not in wanted:
                continue
            if user and user not in str(entry.get("user", "")):
                continue
            if day and not str(entry.get("ts", "")).startswith(day):
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out

    def audit_action(self, who: str, action: str, **details: Any) -> None:
        """One console action in the audit log (who, what, when) and in the daemon's log."""
        log.info("console action", who=who, action=action, **details)
        self.runtime.audit.record(question="", answer="", platform="console", user=who, action=action,
                                  finish="console", **details)

    @staticmethod
    def thread_of(conversation_id: str) -> ThreadKey | None:
        """The thread a console conversation id (a history key's suffix, as :meth:`conversations`
        gives it) names, or None when it is malformed."""
        parts = conversation_id.split(":")
        if len(parts) != 4:
            return None

        def unesc(part: str) -> str:
            return part.replace("%3A", ":").replace("%25", "%")

        platform, bot, chat, thread = (unesc(p) for p in parts)
        return ThreadKey(platform, bot, chat, thread)

    # -- the web console: documents, search, config (the console checks who may) ----------------

    async def search_knowledge(self, kbs: Sequence[str], query: str) -> list[dict[str, Any]]:
        """The chunks a question retrieves from ``kbs``, best first, with their scores."""
        retriever = self.runtime.retriever
        if retriever is None or not kbs:
            return []
        hits = await asyncio.get_running_loop().run_in_executor(None, retriever.search, list(kbs), query)
        return [{"kb": h.kb, "source": h.source, "heading": h.heading, "cite": h.cite, "text": h.text,
                 "score": round(h.score, 4), "similarity": None if h.similarity is None else round(h.similarity, 3),
                 "coverage": round(h.coverage, 3)} for h in hits]

    def knowledge_folder(self, kb: str) -> str | None:
        """Where an uploaded document of ``kb`` goes: its first configured folder (not a file)."""
        import os

        for p in self.cfg.knowledge[kb].paths:
            if os.path.isdir(p):
                return os.path.realpath(p)
        return None

    def knowledge_document(self, kb: str, source: str) -> str | None:
        """The file behind a document's source label (as the index names it), or None: only a
        file that ingestion would find can be named, so no path outside the base's folders can
        (blocking)."""
        from pathlib import Path

        from core.knowledge.ingest import discover

        for label, path in discover([Path(p) for p in self.cfg.knowledge[kb].paths]):
            if label == source:
                return str(path)
        return None

    def ingest_progress(self, kb: str) -> dict[str, Any] | None:
        """The console's re-ingest of ``kb`` under way or last finished (None: none yet)."""
        run = self._console_ingests.get(kb)
        if run is None:
            return None
        now = time.time()
        return {**run, "running": bool(run.get("running")),
                "elapsed_s": round((run.get("finished_at") or now) - run["started_at"], 1)}

    async def reload_config(self, timeout_s: float = 60.0) -> bool | None:
        """Reload config.toml as SIGHUP does: True applied, False refused, None unknown (no hook,
        or still running after ``timeout_s``)."""
        if self.reload_hook is None:
            return None
        task = self.reload_hook()
        if task is None:
            return None
        try:
            return bool(await asyncio.wait_for(asyncio.shield(task), timeout_s))
        except TimeoutError:
            return None
