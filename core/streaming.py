"""Showing an answer while it is written, for platforms that edit messages in place.

A connector says how to show a text (post, then edit; split past its length limit);
:class:`LiveMessage` decides when: on the first text, then no more often than the
interval, later still when the platform asked to slow down (``not_before``), and once
more at the end with the whole answer.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod

from core.dispatch import Answer, Busy, Dispatcher, Interrupted, Rejected
from core.messages import Finish, InboundMessage


class LiveMessage(ABC):
    # Each connector's own words (its connectors/texts.py set, in Chinese and English).
    failed_text: str
    busy_text: str

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.not_before = 0.0  # set by a connector when the platform answers "429, retry after"

    @abstractmethod
    async def show(self, text: str) -> None:
        """Make the platform show ``text`` (the whole answer so far)."""

    async def reply(self, dispatcher: Dispatcher, msg: InboundMessage, placeholder: str | None = None) -> str:
        """Dispatch ``msg`` and show its answer; "busy" and refusals are shown as they are."""
        try:
            answer = await dispatcher.dispatch(msg)
        except Busy as exc:
            await self.show(exc.user_message or self.busy_text.format(s=exc.retry_after))
            return ""
        except Rejected as exc:
            await self.show(exc.message)
            return ""
        try:
            return await self.stream(answer, placeholder)
        finally:
            answer.cancel()  # a no-op once finished; stops the generation if showing failed

    async def stream(self, answer: Answer, placeholder: str | None = None) -> str:
        """Show the answer as it grows; returns the final text ("" when it failed)."""
        shown = ""
        next_at = 0.0
        if placeholder is not None:
            await self.show(placeholder)
            shown, next_at = placeholder, time.monotonic() + self.interval
        text = ""
        final = None
        async for ev in answer.events():
            if ev.done:
                final = ev
                break
            text += ev.delta
            if text.strip() and time.monotonic() >= max(next_at, self.not_before):
                await self.show(text)
                shown, next_at = text, time.monotonic() + self.interval
        if final is not None and final.finish_reason == Finish.SHUTDOWN:
            raise Interrupted(answer.id)
        if final is not None and final.finish_reason == Finish.BUSY:
            # Waited its whole turn without a free model: nothing was generated.
            await self.show(self.busy_text.format(s=final.retry_after or 5))
            return ""
        if final is None or final.finish_reason in (Finish.ERROR, Finish.CANCELLED):
            await self.show(f"{text}\n\n{self.failed_text}" if text.strip() else self.failed_text)
            return ""
        if final.text != shown:
            wait = next_at - time.monotonic()
            if wait > 0:  # the last edit keeps the interval too
                await asyncio.sleep(wait)
            await self.show(final.text if final.text.strip() else "…")
        return final.text
