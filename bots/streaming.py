"""Showing an answer while it is written: the policy, the same for every platform.

The reply target (``connectors/reply.py``) says *how* to show a text on its platform;
:class:`Delivery` decides *when*: a placeholder first where the platform has one, the
first text as soon as there is some, then no more often than the target's interval
(later still when the platform asked to slow down), and once more at the end with the
whole answer. Targets that cannot edit get the final text only. After every new post
the posted ids are recorded in the durable inbox, so that a replay edits, never reposts.
Before every post and edit the inbox confirms the message is still this daemon's (the
target's fence): once another daemon has taken it over, :class:`~core.inbox.NotOwned`
stops this delivery and nothing more is shown from here.
"""

from __future__ import annotations

import asyncio
import time

from bots import texts
from connectors.reply import ReplyTarget
from core.dispatch import Answer, Interrupted
from core.inbox import Inbox
from core.messages import Finish, InboundMessage, ReplyEvent


class Delivery:
    """One message's answer going to its reply target."""

    def __init__(self, msg: InboundMessage, target: ReplyTarget, inbox: Inbox | None = None,
                 lang: texts.Lang | None = None) -> None:
        self.msg = msg
        self.target = target
        self.inbox = inbox
        # The language of botd's own texts for this message (the service decides it from the
        # bot's setting); without one, the message's own language.
        self.lang: texts.Lang = lang or texts.language("auto", msg.text if msg.readable else "")
        self.shown = ""
        self.text = ""  # the last text given to the target (shown, or being shown)
        if inbox is not None:
            target.fence = inbox.fence(msg)

    async def show(self, text: str) -> None:
        self.text = text
        async for sent in self.target.updates(text):
            if self.inbox is not None:
                await self.inbox.note_progress(self.msg, {"sent": sent})
        self.shown = text

    async def stream(self, answer: Answer) -> str:
        """Show the answer as it grows; returns the final text ("" when it failed)."""
        target = self.target
        next_at = 0.0
        if target.placeholder is not None and target.edits and not target.sent:
            await self.show(target.placeholder)
            next_at = time.monotonic() + target.interval
        text = ""
        final: ReplyEvent | None = None
        async for ev in answer.events():
            if ev.done:
                final = ev
                break
            text += ev.delta
            if target.edits and text.strip() and time.monotonic() >= max(next_at, target.not_before):
                await self.show(text)
                next_at = time.monotonic() + target.interval
        if final is not None and final.finish_reason == Finish.SHUTDOWN:
            raise Interrupted(answer.id)
        if final is not None and final.finish_reason == Finish.EXPIRED:
            # Waited its whole turn without a free model: nothing was generated.
            await self.show(texts.say("BUSY", self.lang, s=final.retry_after or 5))
            return ""
        if final is None or final.finish_reason in (Finish.ERROR, Finish.CANCELLED) or (
                not target.edits and not final.text.strip()):
            failed = texts.say("FAILED", self.lang)
            await self.show(f"{text}\n\n{failed}" if text.strip() and target.edits else failed)
            return ""
        # Complete: the target's after-effects (Slack follows the thread) happen before the user
        # can see the last words, so a reply to them finds them done.
        await target.answered()
        if final.text != self.shown:
            wait = next_at - time.monotonic()
            if wait > 0:  # the last edit keeps the interval too
                await asyncio.sleep(wait)
            await self.show(final.text if final.text.strip() else texts.say("EMPTY", self.lang))
        return final.text
