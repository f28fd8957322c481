"""Reading untrusted documents in a child process with a memory ceiling and a time limit.

A parser handed a hostile file (a zip bomb the directory checks let through, a PDF whose
streams inflate without end, a loop that never finishes) must not take the daemon's memory
or its ingest with it. :class:`ParseWorker` keeps one long-lived child for an ingest run
(``python -m core.knowledge.parse_worker``, started at the first document that needs reading);
the child caps its own address space (``RLIMIT_AS``) before it imports a parser and reads one
document per request. A file that runs the child out of memory, kills it or outlasts the time
limit is refused with a reason (:class:`~core.knowledge.guards.UnreadableDocument`); the next
document gets a fresh child. The child never logs itself: its log events come back with the
answer and are logged here, in the daemon's log.

Protocol: one JSON line per request on the child's stdin (``{"path": ...}``), one JSON line per
answer on a private copy of its stdout (``{"sections": [[heading, text], ...]}`` or
``{"error": reason}``, with ``"logs"``); the child's fd 1 points at its stderr, so a library
that prints cannot corrupt an answer.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import structlog

from core.errors import BotdError
from core.knowledge.documents import Section, read_document
from core.knowledge.guards import MB, ParseLimits, UnreadableDocument

log = structlog.get_logger("botd.knowledge")

# How often a wait for the child looks at the ingest's stop flag.
_POLL_S = 0.25
# Log events of one document passed on at most: a damaged PDF can make pypdf complain thousands
# of times; the rest are counted in one line.
MAX_LOG_EVENTS = 20
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50, "exception": 40}


class Interrupted(BotdError):
    """The ingest asked to stop while a document was being read; the child was ended."""


class ParseWorker:
    """One child process reading documents for one ingest run (not thread-safe: the ingest's own)."""

    def __init__(self, limits: ParseLimits | None = None) -> None:
        self.limits = limits or ParseLimits()
        self._proc: subprocess.Popen[bytes] | None = None
        self._answer: int | None = None  # the read end of the child's answers
        self.started = 0  # children started, for the tests and the report

    def __enter__(self) -> ParseWorker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the parent's side -------------------------------------------------------------------------

    def read(self, path: Path, should_stop: Callable[[], bool] = lambda: False) -> list[Section]:
        """The sections of ``path``, read in the child; raises UnreadableDocument or Interrupted."""
        proc = self._child()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({"path": str(path)}).encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):  # died between two documents: once more, with a fresh one
            self._end()
            proc = self._child()
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"path": str(path)}).encode() + b"\n")
            proc.stdin.flush()
        answer = self._wait(proc, should_stop)
        for event in answer.get("logs") or []:
            if isinstance(event, dict):
                level = _LEVELS.get(str(event.pop("level", "info")), 20)
                log.log(level, str(event.pop("event", "")), **{str(k): v for k, v in event.items()})
        if answer.get("logs_dropped"):
            log.warning("the document's reader reported more problems, not logged", file=str(path),
                        count=answer["logs_dropped"])
        if answer.get("fatal"):
            self._end()  # a MemoryError leaves the child in no state to go on
        if "error" in answer:
            raise UnreadableDocument(str(answer["error"])[:300])
        sections = answer.get("sections")
        if not isinstance(sections, list):
            self._end()
            raise UnreadableDocument("the reading process gave no answer")
        return [Section(str(h), str(t)) for h, t in sections]

    def _child(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._end()
        # The child finds this source tree (an editable install, or run from a checkout).
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        read_fd, write_fd = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "core.knowledge.parse_worker", json.dumps(self.limits.to_dict()),
                 str(write_fd), str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(write_fd,), env=env)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._answer = read_fd
        self.started += 1
        return self._proc

    def _wait(self, proc: subprocess.Popen[bytes], should_stop: Callable[[], bool]) -> dict[str, Any]:
        assert self._answer is not None
        deadline = time.monotonic() + self.limits.timeout_s
        # Sections are at most max_text of text; JSON escapes a control character in 6 bytes.
        most = 6 * self.limits.max_text_bytes + MB
        data = bytearray()
        while True:
            if should_stop():
                self._end()
                raise Interrupted("stopped while reading a document")
            left = deadline - time.monotonic()
            if left <= 0:
                self._end()
                raise UnreadableDocument(f"reading it took longer than {self.limits.timeout_s:.0f} s "
                                         "([ingest] parse_timeout_s)")
            ready, _, _ = select.select([self._answer], [], [], min(_POLL_S, left))
            if not ready:
                continue
            chunk = os.read(self._answer, 1 << 20)
            if not chunk:  # the child ended without an answer
                raise UnreadableDocument(self._death(proc))
            data += chunk
            if len(data) > most:
                self._end()
                raise UnreadableDocument("the reading process answered more text than allowed")
            if data.endswith(b"\n"):
                try:
                    answer = json.loads(data)
                except ValueError:
                    self._end()
                    raise UnreadableDocument("the reading process gave a garbled answer") from None
                return answer if isinstance(answer, dict) else {"error": "the reading process gave no answer"}

    def _death(self, proc: subprocess.Popen[bytes]) -> str:
        try:
            code = proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self._end()
        if code is not None and code < 0:
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit status {code}"
        ceiling = f"more than {self.limits.memory_bytes // MB} MB of memory ([ingest] memory_mb)" \
            if self.limits.memory_bytes else "more memory than the machine has"
        return f"the reading process ended without an answer ({how}): the file is damaged or needs {ceiling}"

    def _end(self) -> None:
        """End the child (if any) and forget it: the next document starts a fresh one."""
        proc, self._proc = self._proc, None
        if self._answer is not None:
            os.close(self._answer)
            self._answer = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        """End the child: told to by closing its stdin, killed if it does not go within a few seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None and proc.stdin is not None:
            try:
                proc.stdin.close()
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._end()


# -- the child's side ----------------------------------------------------------------------------


def _set_ceiling(memory_bytes: int) -> None:
    if memory_bytes <= 0:
        return
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _near_ceiling(limits: ParseLimits) -> bool:
    """Whether this process's address space came within half of its ceiling (VmPeak)."""
    if limits.memory_bytes <= 0:
        return False
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmPeak:"):
                    return int(line.split()[1]) * 1024 >= limits.memory_bytes // 2
    except (OSError, ValueError, IndexError):
        pass
    return False


def _serve(limits: ParseLimits, requests: IO[bytes], answers: IO[bytes]) -> int:
    captured: list[dict[str, Any]] = []
    dropped = 0

    def capture(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
        nonlocal dropped
        if len(captured) < MAX_LOG_EVENTS:
            captured.append({k: v if isinstance(v, str | int | float | bool | None) else str(v)[:1000]
                             for k, v in event.items()})
        else:
            dropped += 1
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.processors.add_log_level, capture], cache_logger_on_first_use=False)
    for line in requests:
        captured.clear()
        dropped = 0
        fatal = False
        try:
            path = Path(json.loads(line)["path"])
            answer: dict[str, Any] = {"sections": [[s.heading, s.text] for s in read_document(path, limits)]}
        except UnreadableDocument as exc:
            answer = {"error": str(exc)}
            fatal = _near_ceiling(limits)
        except MemoryError:
            answer, fatal = {}, True
        except Exception as exc:  # a bad request: never a reason to die silently
            answer = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        if fatal:
            # A parser's C library reports a failed allocation its own way (libxml2: "XMLSyntaxError:
            # unknown error"): a failure with the address space this close to the ceiling is the
            # ceiling's. The process ends after answering: its heap is left as large as it grew.
            answer = {"error": f"needs more than {limits.memory_bytes // MB} MB of memory to read "
                               "([ingest] memory_mb)"}
        answer["logs"] = captured
        answer["logs_dropped"] = dropped
        answer["fatal"] = fatal
        # "replace": a PDF's text may hold lone surrogates, which no file (nor this pipe) can hold.
        answers.write(json.dumps(answer, ensure_ascii=False).encode("utf-8", "replace") + b"\n")
        answers.flush()
        if fatal:
            return 1
    return 0


def _die_with_parent(parent: int) -> None:
    """Linux: killed when the thread that started this process ends (a daemon killed mid-ingest
    leaves no parser running on a hostile file); elsewhere the closed stdin ends it after the file."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    limits = ParseLimits(**json.loads(args[0]))
    if len(args) > 2:
        _die_with_parent(int(args[2]))
    _set_ceiling(limits.memory_bytes)
    answers = os.fdopen(int(args[1]), "wb")
    # Whatever a library prints goes to stderr, never into an answer.
    sys.stdout = sys.stderr
    return _serve(limits, sys.stdin.buffer, answers)


if __name__ == "__main__":
    sys.exit(main())
