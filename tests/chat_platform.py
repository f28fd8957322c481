"""A faked chat platform for the tests that send files, pictures and voice through a real daemon:
a reply target that records what it shows and serves the bytes its users sent (by the
attachment's ``ref["id"]``), and :func:`ask`, which sends one message through the bots layer and
waits until the answer is stored.

Used by tests/test_files_in_chat.py, tests/test_ocr.py and tests/test_voice.py.
"""

from __future__ import annotations

from typing import Any

from bots.answers import JobAnswer, TextAnswer
from connectors.reply import AttachmentTooLarge, AttachmentUnavailable, ReplyTarget
from core.messages import Account, Attachment, InboundMessage
from tests.helpers import wait_for


class ChatPlatform(ReplyTarget):
    """The faked platform: what it shows, and the files its users sent (by id)."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        super().__init__(Account("fake", "assistant"), 0.01)
        self.files = files or {}
        self.shown: list[str] = []
        self.downloads = 0

    async def post(self, part: str, first: bool) -> Any:
        self.shown.append(part)
        return len(self.shown) - 1

    async def edit(self, ref: Any, part: str) -> None:
        self.shown[ref] = part

    async def download(self, attachment: Attachment, max_bytes: int) -> bytes:
        self.downloads += 1
        data = self.files.get(str(attachment.ref.get("id")))
        if data is None:
            raise AttachmentUnavailable(f"no such {attachment.kind}")
        if len(data) > max_bytes:  # as connectors/download.py does, while reading
            raise AttachmentTooLarge(f"larger than {max_bytes} bytes")
        return data


async def ask(service: Any, msg: InboundMessage, platform: ChatPlatform) -> JobAnswer | TextAnswer:
    """``msg`` answered by the daemon's chat service, its last event as ``answer.final``; a job's
    answer is waited for until stored."""
    answer = await service.answers.dispatch(msg, platform.download)
    events = [ev async for ev in answer.events()]
    answer.final = events[-1]  # type: ignore[union-attr]
    if isinstance(answer, JobAnswer):
        async def stored() -> bool:  # the exchange is written before the last event: never waits long
            return answer.job.done
        await wait_for(stored)
    return answer
