"""The console connector: an interactive conversation in a terminal (``botd chat``).

It talks to the same dispatcher, worker and history as the daemon's other
connectors. Input is read off the event loop; the answer streams as it is produced.
``/reset`` forgets the conversation, ``/quit`` (or Ctrl-D) leaves, Ctrl-C stops the
current answer.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from typing import TextIO

from connectors.base import Connector, Service
from core.config import Settings
from core.dispatch import Busy, Rejected
from core.kv import KeyValueCache
from core.messages import Finish, InboundMessage

PLATFORM = "console"


class ConsoleConnector(Connector):
    name = "console"

    def __init__(
        self,
        service: Service,
        settings: Settings,
        cache: KeyValueCache,
        bot: str,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        conversation: str = "default",
    ) -> None:
        super().__init__(service, settings, cache)
        self.bot = bot
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.user = getpass.getuser()
        self.conversation = conversation


    def _print(self, text: str, end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    async def _readline(self, prompt: str) -> str | None:
        self.stdout.write(prompt)
        self.stdout.flush()
        line = await asyncio.to_thread(self.stdin.readline)
        return line.rstrip("\n") if line else None

    async def run(self) -> None:
        self._print(f"botd chat with {self.bot!r} ({self.service.model_name}). /reset forgets, /quit leaves.")
        while True:
            line = await self._readline("you> ")
            if line is None:
                self._print("")
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit", "/q"):
                return
            msg = InboundMessage(platform=PLATFORM, bot=self.bot, chat=self.user, user=self.user,
                                 thread=self.conversation, text=text)
            try:
                answer = await self.service.dispatch(msg)
            except Busy as exc:
                self._print(f"[busy: {exc.reason}; try again in {exc.retry_after} s]")
                continue
            except Rejected as exc:
                self._print(f"[{exc.message}]")
                continue
            self.stdout.write(f"{self.bot}> ")
            done = False
            try:
                async for ev in answer.events():
                    if ev.done:
                        done = True
                        if ev.finish_reason == Finish.ERROR:
                            self._print(f"\n[error: {ev.error}]")
                        elif ev.finish_reason in (Finish.LENGTH, Finish.TIMEOUT):
                            self._print(" [cut: reply budget reached]")
                        else:
                            self._print("")
                    else:
                        self.stdout.write(ev.delta)
                        self.stdout.flush()
            except asyncio.CancelledError:
                answer.cancel()
                raise
            finally:
                if not done:
                    answer.cancel()
