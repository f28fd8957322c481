"""The remote engine (``[model] engine = "openai"``): an OpenAI-compatible chat server — vLLM,
llama.cpp's llama-server, Ollama, another botd — behind the one engine interface.

It owns: the HTTP streams to ``POST {base_url}/chat/completions`` (``stream: true`` with usage),
run on a private asyncio loop in a thread of its own, so that the inference worker's
:meth:`RemoteEngine.step` only hands over what has already arrived; how the remote's failures
become botd's outcomes; and counting prompt tokens for history trimming
(:class:`RemoteTokenizer` and its fallbacks).

Outcomes, on the last chunk:

- ``expired`` (:attr:`Finish.EXPIRED`, the outcome of a job that found no free model: nothing
  generated, "busy, try again" for the user, HTTP 503): the remote stayed overloaded (429 /
  503) through the retries.
- ``error``: it could not be reached, timed out, refused the key or the request, or its answer
  broke off; the message says which. Text already streamed stays (a partial answer).
- ``cancelled``: ``should_stop`` (client gone, timeout, shutdown); the stream is closed, which
  makes vLLM and llama-server stop generating.

Retries happen only before the first piece of text: a retry after it would send the start of
the answer twice.

Special tokens: the remote renders the chat template and tokenizes the prompt itself, parsing
special tokens anywhere in it. So every content botd sends (the user's words, history,
documents, tool results) has its template markers defused first (core/engines/special_tokens.py:
the model's own control tokens when ``model.tokenizer_path`` names its GGUF, and the known
families of markers always): ``<|im_start|>system`` typed by a user stays text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from core.engines.base import Chunk, Engine, EngineError, Generation, GenerationRequest, PromptTokenizer
from core.engines.special_tokens import KNOWN, control_pattern, defuse_messages
from core.messages import Finish
from core.toolcalls import plain_messages

log = structlog.get_logger("botd.engine")

# How long step() waits for the remote when nothing has arrived: long enough that the worker
# thread does not spin, short enough that a cancel is noticed at once.
STEP_WAIT_S = 0.05
# The longest the start waits for the remote's /models and /tokenize: an unreachable remote
# must not hold up the daemon's start for timeout_s.
_PROBE_S = 10.0
# The outcomes a call can end with. An overloaded remote is botd's "no free model, try again":
# nothing was generated, and the user is told "busy" (HTTP 503), not "failed".
BUSY = Finish.EXPIRED.value
ERROR = Finish.ERROR.value
# The remote's finish reasons that mean "the model ended its answer".
_STOP_REASONS = {"stop", "eos", "end_turn", "stop_sequence", "tool_calls", "function_call", "content_filter"}


class _Retry(Exception):
    """This attempt failed before any text was handed out; another may succeed."""

    def __init__(self, outcome: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.retry_after = retry_after


class _Fail(Exception):
    """This request ends now with ``outcome`` (no retry can help, or text was already sent)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


class _Call(Generation):
    """One request to the remote. The private loop appends to ``inbox``; the worker thread
    moves it to ``out`` in :meth:`RemoteEngine.step`."""

    def __init__(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> None:
        super().__init__()
        self.request = request
        self.should_stop = should_stop
        self.lock = threading.Lock()
        self.inbox: list[Chunk] = []
        self.future: concurrent.futures.Future[None] | None = None
        # Written on the private loop only.
        self.sent_text = False
        self.pieces = 0


def _root(base_url: str) -> str:
    """The server's root, where llama-server and vLLM serve /tokenize (not under /v1)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header: seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-style error body, or its first 200 characters."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:200] or "no detail"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
        if data.get("detail"):
            return str(data["detail"])[:200]
    return text[:200]


class _Loop:
    """A private asyncio loop on its own thread, with the one aiohttp session the streams share."""

    def __init__(self, limit: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="botd-remote-engine", daemon=True)
        self.thread.start()
        self.session: aiohttp.ClientSession = self.call(self._session(limit), 10)

    @staticmethod
    async def _session(limit: int) -> aiohttp.ClientSession:
        # One connection per request in flight (and a spare for /models); proxies from the
        # environment are not used: the remote is named by base_url.
        # read_bufsize: the longest line of the stream (aiohttp's 64 KiB would fail one big piece).
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit + 1), trust_env=False,
                                     read_bufsize=1 << 20)

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Any, timeout: float) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.session.close()

        try:
            self.call(shutdown(), 10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("the remote engine's connections did not close in time")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class RemoteEngine(Engine):
    """Streams each reply from an OpenAI-compatible server; up to ``max_concurrent`` at once."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str = "",
        n_ctx: int = 4096,
        timeout_s: float = 60.0,
        max_concurrent: int = 4,
        tokenizer_path: str = "",
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._n_ctx = n_ctx
        self.timeout_s = timeout_s
        self.parallel = max_concurrent
        self.tokenizer_path = tokenizer_path
        self.retries = retries
        self.backoff_s = backoff_s
        self._headers = {"Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._loop: _Loop | None = None
        self._tokenizer: PromptTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        # Set by the private loop whenever a call receives something: step() waits on it.
        self._wake = threading.Event()
        self._calls: set[_Call] = set()
        self._auth_logged = False
        # The markers defused in every content: the known families, and the model's own control
        # tokens once a local vocabulary of it is loaded (tokenizer()).
        self._markers: re.Pattern[str] = KNOWN
        self.stats = {"requests": 0, "retries": 0, "busy": 0, "errors": 0}

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    # -- lifecycle --------------------------------------------------------------------------------

    def load(self) -> None:
        """Start the private loop and ask the remote which models it serves.

        A refused key stops the start (a config error); an unreachable remote does not: it may
        come up later, and each request says so until it does.
        """
        self._loop = _Loop(self.parallel)
        try:
            models = self._loop.call(self._models(), _PROBE_S + 5)
        except _Fail as exc:
            self.close()
            raise EngineError(exc.message) from None
        except (_Retry, concurrent.futures.TimeoutError) as exc:
            log.warning("the remote engine does not answer yet; requests fail until it does",
                        base_url=self.base_url, error=str(exc) or "timeout")
            models = None
        if models is not None and not self.model and models:
            self.model = models[0]
        if models and self.model not in models:
            log.warning("the remote engine does not list this model; requests may be refused",
                        model=self.model, served=models[:10])
        log.info("remote engine", base_url=self.base_url, model=self.model or "(the remote's default)",
                 max_concurrent=self.parallel, timeout_s=self.timeout_s, n_ctx=self._n_ctx)

    async def _models(self) -> list[str] | None:
        """The ids of GET {base_url}/models; None when the remote has no such list."""
        assert self._loop is not None
        timeout = aiohttp.ClientTimeout(total=min(self.timeout_s, _PROBE_S))
        try:
            async with self._loop.session.get(f"{self.base_url}/models", headers=self._headers,
                                              timeout=timeout) as resp:
                body = await resp.content.read(1 << 20)
                if resp.status in (401, 403):
                    raise _Fail(ERROR, f"model.api_key: the remote engine at {self.base_url} refused the key "
                                f"(HTTP {resp.status}: {_error_text(body)})")
                if resp.status != 200:
                    return None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _Retry(ERROR, f"{type(exc).__name__}: {exc}") from None
        try:
            data = json.loads(body)
            return [str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
        except (ValueError, TypeError, AttributeError):
            return None

    def tokenizer(self) -> PromptTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = _choose_tokenizer(self.base_url, self._headers, self.model, self.tokenizer_path,
                                                    min(self.timeout_s, _PROBE_S))
                self._markers = _markers(self._tokenizer)
            return self._tokenizer

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()

    # -- requests ---------------------------------------------------------------------------------

    def open(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> _Call:
        if self._loop is None:
            raise EngineError("the remote engine is not started")
        call = _Call(request, should_stop)
        self._calls.add(call)
        call.future = self._loop.submit(self._run(call))
        return call

    def step(self, generations: Sequence[Generation]) -> None:
        """Hand over what arrived for each call; when nothing did, wait a little for it."""
        self._wake.clear()
        if not self._take(generations) and any(not g.done for g in generations):
            self._wake.wait(STEP_WAIT_S)
            self._take(generations)

    def _take(self, generations: Sequence[Generation]) -> bool:
        moved = False
        for gen in generations:
            assert isinstance(gen, _Call)
            if gen.done:
                continue
            with gen.lock:
                items, gen.inbox = gen.inbox, []
            text = "".join(c.text for c in items if c.finish_reason is None)
            final = next((c for c in items if c.finish_reason is not None), None)
            if text:
                gen.out.append(Chunk(text))
                moved = True
            if final is not None:
                gen.out.append(final)
                gen.done = True
                self._calls.discard(gen)
                moved = True
            elif gen.should_stop():
                self.release(gen)
                gen.out.append(Chunk("", "cancelled", completion_tokens=gen.pieces))
                gen.done = True
                moved = True
        return moved

    def release(self, generation: Generation) -> None:
        assert isinstance(generation, _Call)
        self._calls.discard(generation)
        if generation.future is not None and not generation.future.done():
            # Cancels the task on the private loop: its stream is closed.
            generation.future.cancel()

    def state(self) -> dict[str, Any]:
        kind = type(self._tokenizer).__name__ if self._tokenizer is not None else None
        return {"remote": self.base_url, "model": self.model, "slots": self.parallel,
                "active_sequences": len(self._calls), "tokenizer": kind, **self.stats}

    # -- on the private loop ----------------------------------------------------------------------

    def _push(self, call: _Call, chunk: Chunk) -> None:
        with call.lock:
            call.inbox.append(chunk)
        self._wake.set()

    async def _run(self, call: _Call) -> None:
        attempt = 0
        try:
            while True:
                attempt += 1
                self.stats["requests"] += 1
                try:
                    await self._stream(call)
                    return
                except _Retry as exc:
                    wait = exc.retry_after
                    if wait is None:
                        wait = min(self.backoff_s * 2 ** (attempt - 1), 8.0) * random.uniform(0.8, 1.2)
                    # Bounded by count; a remote asking for a wait longer than timeout_s is not waited for.
                    if attempt > self.retries or wait > self.timeout_s:
                        tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                        raise _Fail(exc.outcome, f"{exc.message} ({tries})") from None
                    self.stats["retries"] += 1
                    log.info("remote engine: retrying", attempt=attempt, wait_s=round(wait, 2), reason=exc.message)
                    await asyncio.sleep(wait)
        except _Fail as exc:
            self.stats["busy" if exc.outcome == BUSY else "errors"] += 1
            log.warning("remote engine request failed", outcome=exc.outcome, error=exc.message,
                        pieces_sent=call.pieces, base_url=self.base_url)
            self._push(call, Chunk("", exc.outcome, completion_tokens=call.pieces, error=exc.message))
        except Exception as exc:  # a bug here must still end the call, or its job would hang
            log.exception("remote engine request failed unexpectedly")
            self.stats["errors"] += 1
            self._push(call, Chunk("", ERROR, completion_tokens=call.pieces,
                                   error=f"remote engine: {type(exc).__name__}: {exc}"))

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        messages = plain_messages(request.messages, request.tools) if request.tools else request.messages
        body: dict[str, Any] = {
            "model": self.model or "default",
            # Tools reach the remote as text in its prompt, as for any template without them; no
            # content may carry a live template marker (the remote parses them anywhere).
            "messages": defuse_messages(messages, self._markers),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.seed >= 0:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)[:4]  # the OpenAI API takes at most 4
        return body

    async def _stream(self, call: _Call) -> None:
        """One attempt. Raises :class:`_Retry` (nothing was handed out yet) or :class:`_Fail`."""
        assert self._loop is not None
        # What the user may read (HTTP API errors): the remote's address stays in the log.
        where = "the remote engine"
        # connect: to open the connection; sock_read: the answer's start and each next piece.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        finish: str | None = None
        usage: dict[str, Any] | None = None
        done = False
        resp: aiohttp.ClientResponse | None = None
        try:
            resp = await self._loop.session.post(f"{self.base_url}/chat/completions", json=self._body(call.request),
                                                 headers=self._headers, timeout=timeout)
            if resp.status != 200:
                await self._refused(resp, where)
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank lines between events, ": keep-alive" comments, "event:" names
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise _Fail(ERROR, f"{where} sent a piece that is not JSON: {data[:80]!r}") from None
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    self._stream_error(call, event["error"], where)
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text:
                        call.sent_text = True
                        call.pieces += 1
                        self._push(call, Chunk(text))
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        except (_Retry, _Fail):
            raise
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            if call.sent_text:
                raise _Fail(ERROR, f"{where} stopped sending after {call.pieces} pieces "
                            f"(nothing for {self.timeout_s:g} s, model.timeout_s)") from None
            raise _Retry(ERROR, f"{where} did not answer within {self.timeout_s:g} s (model.timeout_s)") from None
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            raise _Retry(ERROR, f"cannot reach {where}: {exc.strerror or exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            if call.sent_text:
                raise _Fail(ERROR, f"{where} broke off the answer after {call.pieces} pieces "
                            f"({type(exc).__name__}: {exc})") from None
            raise _Retry(ERROR, f"{where} closed the connection before answering ({type(exc).__name__})") from None
        finally:
            if resp is not None and not done:
                # Closed, not returned to the pool: the remote sees the client go and stops generating.
                resp.close()
            elif resp is not None:
                resp.release()
        if not done and finish is None:
            if call.sent_text:
                raise _Fail(ERROR, f"{where} broke off the answer after {call.pieces} pieces (the stream ended "
                            "without finishing)")
            raise _Retry(ERROR, f"{where} ended the stream without an answer")
        await self._finish(call, finish, usage)

    async def _refused(self, resp: aiohttp.ClientResponse, where: str) -> None:
        """A non-200 answer: always raises."""
        try:
            detail = _error_text(await resp.content.read(8192))
        except (TimeoutError, aiohttp.ClientError):
            detail = "no detail"
        status = resp.status
        if status in (429, 503):
            raise _Retry(BUSY, f"{where} is busy (HTTP {status}: {detail})",
                         _retry_after(resp.headers.get("Retry-After")))
        if status in (502, 504):
            raise _Retry(ERROR, f"{where} failed (HTTP {status}: {detail})")
        if status in (401, 403):
            # Every request would be refused the same way: say it once, at error level.
            if not self._auth_logged:
                self._auth_logged = True
                log.error("the remote engine refuses botd's key: check model.api_key", base_url=self.base_url,
                          status=status)
            raise _Fail(ERROR, f"model.api_key: {where} refused botd's key (HTTP {status}: {detail})")
        if status == 404:
            raise _Fail(ERROR, f"{where} answered 404 for model {self.model!r} ({detail}); check model.base_url "
                        "(it ends in /v1 for vLLM, llama-server and Ollama) and model.model")
        raise _Fail(ERROR, f"{where} refused the request (HTTP {status}: {detail})")

    def _stream_error(self, call: _Call, err: Any, where: str) -> None:
        """An error event inside the stream: always raises."""
        message = err.get("message") if isinstance(err, dict) else str(err)
        kind = " ".join(str(err.get(k, "")) for k in ("type", "code")) if isinstance(err, dict) else ""
        overloaded = any(w in kind.lower() for w in ("overloaded", "busy", "503", "429", "rate_limit"))
        if not call.sent_text and overloaded:
            raise _Retry(BUSY, f"{where} is busy ({message})")
        if call.sent_text:
            raise _Fail(ERROR, f"{where} failed after {call.pieces} pieces: {message}")
        raise _Fail(ERROR, f"{where} failed: {message}")

    async def _finish(self, call: _Call, finish: str | None, usage: dict[str, Any] | None) -> None:
        reason = "length" if finish == "length" else "stop"
        if finish is not None and finish not in _STOP_REASONS and finish != "length":
            log.debug("remote finish reason taken as stop", finish_reason=finish)
        prompt = completion = cached = 0
        if usage:
            prompt = int(usage.get("prompt_tokens") or 0)
            completion = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        if not completion:
            completion = call.pieces  # servers that send no usage: one token per piece, near enough
        if not prompt and self._tokenizer is not None:
            prompt = await asyncio.to_thread(self._tokenizer.count_chat, call.request.messages, call.request.tools)
        self._push(call, Chunk("", reason, prompt, completion, cached_tokens=cached))


# -- counting prompt tokens --------------------------------------------------------------------------

def _post_json(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> Any:
    """A blocking JSON POST (the prompt builder counts tokens in a worker thread)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={**headers, "Accept": "application/json", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment
    with opener.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class EstimatedTokenizer(PromptTokenizer):
    """No tokenizer at hand: characters / 3, CJK characters one token each (a Chinese character
    is about one token in Qwen's vocabulary; counting it as a third would overfill the context),
    and a few tokens per message for the chat template's markers."""

    PER_MESSAGE = 4

    def count_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> int:
        messages = plain_messages(messages, tools) if tools else messages
        return 2 + sum(self.PER_MESSAGE + self.count_text(m.get("content", "")) for m in messages)

    @staticmethod
    def count_text(text: str) -> int:
        cjk = sum(1 for ch in text if "\u2e80" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af"
                  or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef")
        return cjk + math.ceil((len(text) - cjk) / 3)


class RemoteTokenizer(PromptTokenizer):
    """The remote's own tokenizer: llama-server's /apply-template + /tokenize (the exact prompt
    it will read), or vLLM's /tokenize with messages. A failed call counts with ``fallback``."""

    def __init__(self, root: str, kind: str, headers: dict[str, str], model: str, timeout: float,
                 fallback: PromptTokenizer) -> None:
        self.root = root
        self.kind = kind
        self.headers = {k: v for k, v in headers.items() if k == "Authorization"}
        self.model = model
        self.timeout = timeout
        self.fallback = fallback
        self.markers = _markers(fallback)
        self._warned = False

    def count_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> int:
        messages = plain_messages(messages, tools) if tools else messages
        messages = defuse_messages(messages, self.markers)  # as they will be sent
        try:
            return count_remote(self.root, self.kind, self.headers, self.model, list(messages), self.timeout)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not self._warned:
                self._warned = True
                log.warning("the remote's /tokenize failed; counting tokens by estimate until it answers",
                            error=f"{type(exc).__name__}: {exc}")
            return self.fallback.count_chat(messages)


def count_remote(root: str, kind: str, headers: dict[str, str], model: str, messages: list[dict[str, str]],
                 timeout: float) -> int:
    if kind == "llama-server":
        prompt = _post_json(f"{root}/apply-template", {"messages": messages}, headers, timeout)["prompt"]
        tokens = _post_json(f"{root}/tokenize", {"content": prompt, "add_special": True, "parse_special": True},
                            headers, timeout)["tokens"]
        return len(tokens)
    body: dict[str, Any] = {"messages": messages, "add_generation_prompt": True}
    if model:  # vLLM takes its one model when none is named
        body["model"] = model
    data = _post_json(f"{root}/tokenize", body, headers, timeout)
    return int(data["count"])


def _choose_tokenizer(base_url: str, headers: dict[str, str], model: str, tokenizer_path: str,
                      timeout: float) -> PromptTokenizer:
    """The remote's /tokenize when it has one (asked once, here), else the local GGUF vocabulary
    in ``tokenizer_path``, else the estimate; one log line says which."""
    root = _root(base_url)
    estimate = EstimatedTokenizer()
    probe = [{"role": "user", "content": "hello"}]
    auth = {k: v for k, v in headers.items() if k == "Authorization"}
    for kind in ("llama-server", "vllm"):
        try:
            n = count_remote(root, kind, auth, model, probe, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                # A refused key is the config error load() reports (asked first, at start), not
                # "no tokenizer": one line, and no more requests with that key.
                raise EngineError(f"model.api_key: the remote engine at {base_url} refused the key "
                                  f"(HTTP {exc.code}: {_error_text(exc.read())})") from None
            continue
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
            continue
        if n > 0:
            log.info("counting prompt tokens with the remote's tokenizer", endpoint=f"{root}/tokenize", api=kind)
            local = _local_tokenizer(tokenizer_path) if tokenizer_path else None
            return RemoteTokenizer(root, kind, headers, model, timeout, local or estimate)
    if tokenizer_path:
        local = _local_tokenizer(tokenizer_path)
        log.info("counting prompt tokens with a local vocabulary", tokenizer_path=tokenizer_path)
        return local
    log.warning("no tokenizer for the remote model: prompt tokens are estimated as characters / 3 (CJK "
                "characters 1 each); history is trimmed by that estimate. Set model.tokenizer_path to the "
                "model's GGUF file for exact counts", remote=base_url)
    return estimate


def _markers(tokenizer: PromptTokenizer | None) -> re.Pattern[str]:
    """What to defuse: the known marker families, and the control tokens of the local GGUF
    vocabulary (model.tokenizer_path) when the tokenizer is, or falls back to, one."""
    local = tokenizer if hasattr(tokenizer, "control_texts") else getattr(tokenizer, "fallback", None)
    texts: list[str] = getattr(local, "control_texts", None) or []
    return control_pattern(texts, known=True) or KNOWN


def _local_tokenizer(path: str) -> PromptTokenizer:
    file = Path(path).expanduser()
    if not file.is_file():
        raise EngineError(f"model.tokenizer_path: no such file {str(file)!r}")
    with file.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise EngineError(f"model.tokenizer_path: {str(file)!r} is not a GGUF file")
    from core.engines.llamacpp import LlamaCppTokenizer

    return LlamaCppTokenizer(file)
