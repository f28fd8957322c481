"""The audit log: one JSON line per answered message — who asked which bot what, when,
with which tokens and latency — in a file of the admin's choosing.

Lines go through a queue to a writer thread (stdlib ``QueueHandler``/``QueueListener``),
so the event loop never waits on the disk. With ``redact_text`` the question and the
answer are replaced by their length and a SHA-256 prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import queue
import time
from pathlib import Path
from typing import Any

from core.config import AuditConfig


def _redacted(text: str) -> dict[str, Any]:
    return {"chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


class AuditLog:
    def __init__(self, cfg: AuditConfig) -> None:
        self.cfg = cfg
        self._listener: logging.handlers.QueueListener | None = None
        self._logger = logging.getLogger(f"botd.audit.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        if cfg.file:
            path = Path(cfg.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
            self._logger.addHandler(logging.handlers.QueueHandler(q))
            self._listener = logging.handlers.QueueListener(q, handler)
            self._listener.start()

    @property
    def enabled(self) -> bool:
        return self._listener is not None

    def record(self, *, question: str, answer: str, **fields: Any) -> None:
        if not self.enabled:
            return
        entry: dict[str, Any] = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
        if self.cfg.redact_text:
            entry["question"], entry["answer"] = _redacted(question), _redacted(answer)
        else:
            entry["question"], entry["answer"] = question, answer
        self._logger.info(json.dumps(entry, ensure_ascii=False))

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()  # writes what is queued, then stops the thread
            for h in self._listener.handlers:
                h.close()
            self._listener = None
