"""The chat service: the bots layer assembled, and what the connectors are handed.

One object per daemon wires the parts of the top floor, each serving one audience:

- :mod:`bots.pipeline` — the answer pipeline, ``dispatch``: a message to an answer;
- :mod:`bots.delivery` — platform messages received, recorded, answered into their reply
  targets, resumed after a restart or taken over from another daemon;
- :mod:`bots.commands` — the chat commands and their answers;
- :mod:`bots.admin` — the web console's backend (handed to the console alone);
- :mod:`bots.tasks` — the one registry of background tasks, drained at a stop.

:class:`ChatService` itself is the :class:`connectors.base.Service` that platform
connectors and request/response edges (the HTTP API, ``botd chat``) call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from bots.admin import AdminBackend
from bots.answers import JobAnswer, TextAnswer, load_history, reset_thread
from bots.attachments import Download
from bots.commands import KNOWN, ChatCommands
from bots.delivery import Platforms
from bots.feedback import FeedbackDesk
from bots.pipeline import AnswerPipeline
from bots.routing import route
from bots.tasks import TaskRegistry
from connectors.reply import ReplyTarget
from core.config import Config, Settings
from core.feedback import FeedbackEvent, FeedbackReply
from core.messages import Account, ChatTurn, InboundMessage, ThreadKey
from core.runtime import Runtime

if TYPE_CHECKING:
    from connectors.base import Service
    from connectors.web_console.backend import ConsoleBackend


class ChatService:
    """The top floor's parts, built once; the platform connectors' service."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.tasks = TaskRegistry()
        self.commands = ChatCommands(settings, runtime, self.tasks)
        self.answers = AnswerPipeline(settings, runtime, self.tasks, self.commands)
        self.platforms = Platforms(settings, runtime, self.tasks, self.answers)
        self.admin = AdminBackend(settings, runtime, self.tasks, self.answers)
        self.feedback_desk = FeedbackDesk(settings, runtime)

    @property
    def cfg(self) -> Config:
        return self.settings.config

    # -- connectors.base.Service ---------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.cfg.model.name

    @property
    def n_ctx(self) -> int:
        return self.cfg.model.n_ctx

    @property
    def command_names(self) -> Sequence[str]:
        return KNOWN

    def bot_names(self) -> list[str]:
        return sorted(self.cfg.bots)

    async def route(self, msg: InboundMessage, account: Account,
                    departments: Callable[[], Awaitable[Sequence[str]]] | None = None) -> str:
        return await route(self.cfg.routes, msg, account, departments)

    async def receive(self, msg: InboundMessage, target: ReplyTarget) -> bool:
        return await self.platforms.receive(msg, target)

    async def dispatch(self, msg: InboundMessage, download: Download | None = None) -> JobAnswer | TextAnswer:
        return await self.answers.dispatch(msg, download)

    def answered_by(self, answer: Any) -> str:
        return self.answers.answered_by(answer)

    async def reset(self, thread: ThreadKey) -> bool:
        return await reset_thread(self.runtime, self.cfg, thread)

    async def history(self, thread: ThreadKey) -> list[ChatTurn]:
        return await load_history(self.runtime, self.cfg, thread)

    async def feedback(self, event: FeedbackEvent) -> FeedbackReply:
        return await self.feedback_desk.handle(event)

    # -- the daemon's ----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.runtime.health()

    def hooks(self, ingest: Callable[[str], Any], reload: Callable[[], Awaitable[bool] | None]) -> None:
        """What the daemon does for the bots layer: re-ingest a knowledge base (the admins'
        "/kb ingest", the console's re-ingest) and reload config.toml (the console's "Reload")."""
        self.commands.ingest_hook = self.admin.ingest_hook = ingest
        self.admin.reload_hook = reload


if TYPE_CHECKING:
    def _fits(service: ChatService) -> tuple[Service, ConsoleBackend]:
        """mypy checks here that what the daemon hands the edges is what they declare they need."""
        return service, service.admin
