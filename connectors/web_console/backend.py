"""What the web console needs of botd: its admin backend, declared here, handed in by the daemon.

The console is an admin application at the edge: it checks who asks (logins, roles, CSRF)
and what they may see; the backend reads and steers (conversations, knowledge, the audit
log, a reload) and answers the console's chat. Nothing here is what a platform connector
sees (:class:`connectors.base.Service`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol

from core.dispatch import Answer
from core.feedback import FeedbackEvent, FeedbackReply
from core.messages import Attachment, InboundMessage, ThreadKey


class BackendRefusal(Exception):
    """The backend refuses what a user asked (bad input, a conflict): an HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ConsoleBackend(Protocol):
    """The console's backend; each read takes the bots the asking user may see."""

    @property
    def n_ctx(self) -> int: ...

    def bot_names(self) -> list[str]: ...

    def health(self) -> dict[str, Any]: ...

    def connector_names(self) -> list[str]:
        """The connectors the running config enables (registry names), in start order."""
        ...

    # The console's chat.

    async def dispatch(self, msg: InboundMessage,
                       download: Callable[[Attachment, int], Awaitable[bytes]] | None = None) -> Answer:
        """``msg`` answered; ``download`` fetches its attachments (the chat's uploads)."""
        ...

    async def reset(self, thread: ThreadKey) -> bool: ...

    def answer_details(self, answer: Any) -> dict[str, Any]: ...

    def waiting_notice(self, msg: InboundMessage, answer: Any) -> str | None:
        """What a user still waiting for the model is told (their place in line), or None."""
        ...

    def feedback_id(self, msg: InboundMessage, answer: Any) -> str | None:
        """The id 👍 / 👎 name ``msg``'s finished answer by, or None when it takes no feedback (a
        fixed text, a bot with feedback off)."""
        ...

    async def feedback(self, event: FeedbackEvent) -> FeedbackReply:
        """A 👍 / 👎 or a reason from the console's chat: checked (the asker's own conversation)
        and stored."""
        ...

    # The last hour's figures (sampled while the console runs).

    async def sample_stats(self, every_s: float) -> None: ...

    def last_hour(self) -> dict[str, Any]: ...

    # Conversations.

    async def conversations(self, bots: Collection[str], platform: str | None = None,
                            limit: int = 500) -> list[dict[str, Any]]: ...

    async def conversation(self, thread: ThreadKey) -> list[dict[str, Any]]: ...

    def thread_of(self, conversation_id: str) -> ThreadKey | None: ...

    # Knowledge.

    async def knowledge_status(self, bots: Collection[str]) -> list[dict[str, Any]]: ...

    def reingest(self, kb: str) -> bool: ...

    def ingest_progress(self, kb: str) -> dict[str, Any] | None: ...

    async def search_knowledge(self, kbs: Sequence[str], query: str) -> list[dict[str, Any]]: ...

    def knowledge_folder(self, kb: str) -> str | None: ...

    def knowledge_document(self, kb: str, source: str) -> str | None: ...

    # Audit and config.

    async def audit_tail(self, bots: Collection[str] | None, *, user: str = "", day: str = "",
                         limit: int = 200, max_bytes: int = 2_000_000) -> list[dict[str, Any]] | None: ...

    def audit_action(self, who: str, action: str, **details: Any) -> None: ...

    async def reload_config(self, timeout_s: float = 60.0) -> bool | None: ...

    # The quality pages (bots/quality_admin.py): usage, unanswered questions, export, eval runs.

    async def usage(self, bots: Collection[str]) -> dict[str, Any]: ...

    async def unanswered(self, bots: Collection[str], kbs: Collection[str],
                         days: int = 90) -> dict[str, list[dict[str, Any]]]: ...

    def export_rows(self, bots: Collection[str], since: str, until: str) -> AsyncIterator[dict[str, Any]]:
        """The messages of ``bots`` sent from day ``since`` to day ``until`` (YYYY-MM-DD, UTC, both
        included, either may be ""); :class:`BackendRefusal` (400) for a day that is not one."""
        ...

    async def eval_runs(self, bot: str) -> list[dict[str, Any]]: ...

    async def eval_run(self, bot: str, name: str) -> dict[str, Any] | None: ...

    async def add_eval_case(self, bot: str, question: str) -> str:
        """Append ``question`` to ``bot``'s test set; the set's path. :class:`BackendRefusal`: 400, 409."""
        ...
