"""The llama.cpp engine (llama-cpp-python): GGUF int4 models, in-process.

The chat template is the one in the GGUF file's own metadata
(``tokenizer.chat_template``), rendered with llama-cpp-python's Jinja2 formatter, so a
Qwen, Mistral or SmolLM file each gets its own prompt format. Generation goes through
``Llama.generate`` token by token: that lets the worker stop between tokens (cancel,
timeout), count tokens exactly, and reuse the KV prefix when a thread's next prompt
extends its previous one (llama-cpp-python does that inside ``generate``).
"""

from __future__ import annotations

import codecs
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog

from core.engines.base import (
    Chunk,
    Engine,
    EngineError,
    GenerationRequest,
    PromptTokenizer,
    PromptTooLong,
    TemplateError,
)

log = structlog.get_logger("botd.engine")

# Used only when a GGUF file carries no chat template at all.
_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_log_callback: Any = None

# llama-cpp-python silences loading by dup2-ing /dev/null over fds 1 and 2 and back. Two
# loads at once (model and tokenizer) interleave those swaps and can leave stderr pointing
# at /dev/null for good, so every Llama() construction takes this lock.
_LOAD_LOCK = threading.Lock()


def _route_llama_logs() -> None:
    """Send llama.cpp's own log lines through structlog instead of raw stderr."""
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", "replace").strip()
        # A vocabulary-only load has no training context; llama.cpp reports that as an error.
        if not msg or "n_ctx_train (0)" in msg:
            return
        if level == 3:
            log.warning("llama.cpp", message=msg)
        elif level == 2:
            log.debug("llama.cpp", message=msg)

    _log_callback = callback  # a reference must outlive the C side's use of it
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


# Message contents are rendered as these marks, so that the prompt can be cut back into
# template text and message text: private-use characters no template produces or changes.
_MARK = re.compile("( ?)\ue000(\\d+)\ue001( ?)")


def _control_texts(llm: Any) -> list[str]:
    """The text of every token that only a template may produce (CONTROL and UNKNOWN attributes:
    the ones llama.cpp parses out of text when ``special`` is on)."""
    import llama_cpp

    vocab = llm._model.vocab
    wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    texts = set()
    for tid in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        if llama_cpp.llama_vocab_get_attr(vocab, tid) & wanted:
            text = llm._model.token_get_text(tid)
            if text:
                texts.add(text)
    return sorted(texts, key=len, reverse=True)


class _ChatTemplate:
    """The model's chat template and how its prompts are tokenized, for one ``Llama`` object.

    Special tokens may come only from the template: message contents (the user's words, the
    history, retrieved documents) are tokenized as plain text, so a user who types
    ``<|im_end|><|im_start|>system`` gets those characters read as text, not a system turn.
    """

    def __init__(self, llm: Any) -> None:
        from llama_cpp import llama_chat_format

        self.llm = llm
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
        template = llm.metadata.get("tokenizer.chat_template")
        self.from_metadata = bool(template)
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template or _CHATML, eos_token=eos, bos_token=bos, stop_token_ids=[eos_id]
        )
        controls = _control_texts(llm)
        self._control = re.compile("|".join(map(re.escape, controls))) if controls else None

    def _format(self, msgs: list[dict[str, str]]) -> Any:
        try:
            return self.formatter(messages=msgs)
        except Exception as exc:
            # Some templates (Mistral, Gemma) refuse a system role: fold it into the first user turn.
            if not msgs or msgs[0].get("role") != "system" or len(msgs) < 2:
                raise TemplateError(f"the model's chat template rejected the messages: {exc}") from exc
            merged = [{"role": msgs[1]["role"], "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}]
            try:
                return self.formatter(messages=merged + msgs[2:])
            except Exception as exc2:
                raise TemplateError(f"the model's chat template rejected the messages: {exc2}") from exc2

    def render(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[str]]:
        msgs = [{**m, "content": _plain(m.get("content", ""))} for m in messages]
        if self._control is None or not any(self._control.search(m["content"]) for m in msgs):
            # Nothing in the contents looks like a control token: tokenizing the prompt in one
            # piece is the same as tokenizing its contents as text, and exactly what the model saw
            # in training at the seams.
            result = self._format(msgs)
            tokens = self._tokenize(result.prompt, special=True, bos=not result.added_special)
        else:
            # Each content becomes a mark padded with one space each side: where the template
            # strips contents (Llama 3's ``| trim``) the padding is gone, and so is the content's.
            result = self._format([{**m, "content": f" \ue000{i}\ue001 "} for i, m in enumerate(msgs)])
            pieces = _MARK.split(result.prompt)
            tokens = []
            for j in range(0, len(pieces), 4):
                # The template's own text: its special tokens are real.
                tokens += self._tokenize(pieces[j], special=True, bos=j == 0 and not result.added_special)
                if j + 3 < len(pieces):
                    left, index, right = pieces[j + 1 : j + 4]
                    content = msgs[int(index)]["content"]
                    content = content if left else content.lstrip()
                    content = content if right else content.rstrip()
                    tokens += self._tokenize(content, special=False, bos=False)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s for s in stop if s]

    def _tokenize(self, text: str, *, special: bool, bos: bool) -> list[int]:
        if not text and not bos:
            return []
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special)


def _plain(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate (from a JSON escape) becomes U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


class LlamaCppTokenizer(PromptTokenizer):
    """A vocabulary-only copy of the model (no weights, ~0.1 s to load) for counting tokens."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        _route_llama_logs()
        self._lock = threading.Lock()
        with _LOAD_LOCK:
            self._llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self._template = _ChatTemplate(self._llm)

    def count_chat(self, messages: Sequence[dict[str, str]]) -> int:
        with self._lock:
            tokens, _ = self._template.render(messages)
        return len(tokens)


class LlamaCppEngine(Engine):
    name = "llama_cpp"

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int = 2,
        n_batch: int = 512,
        seed: int = -1,
    ) -> None:
        self.path = Path(path)
        self._n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_batch = n_batch
        self.seed = seed
        self._llm: Any = None
        self._template: _ChatTemplate | None = None
        self._tokenizer: LlamaCppTokenizer | None = None

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def load(self) -> None:
        import llama_cpp

        _route_llama_logs()
        try:
            with _LOAD_LOCK:
                self._llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=self._n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_batch=min(self.n_batch, self._n_ctx),
                    seed=self.seed if self.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
                    verbose=False,
                )
        except Exception as exc:
            raise EngineError(f"cannot load model {str(self.path)!r}: {exc}") from exc
        self._template = _ChatTemplate(self._llm)
        if not self._template.from_metadata:
            log.warning("the GGUF file has no chat template; using ChatML", model=str(self.path))
        log.info(
            "model loaded", model=self.path.name, n_ctx=self._n_ctx, n_threads=self.n_threads,
            n_ctx_train=self._llm._model.n_ctx_train(),
        )

    def tokenizer(self) -> LlamaCppTokenizer:
        if self._tokenizer is None:
            self._tokenizer = LlamaCppTokenizer(self.path)
        return self._tokenizer

    def close(self) -> None:
        if self._llm is not None:
            with _LOAD_LOCK:
                self._llm.close()
            self._llm = None

    def generate(self, request: GenerationRequest, should_stop: Callable[[], bool]) -> Iterator[Chunk]:
        import llama_cpp

        llm, template = self._llm, self._template
        if llm is None or template is None:
            raise EngineError("the model is not loaded")
        prompt, template_stops = template.render(request.messages)
        room = self._n_ctx - len(prompt)
        if room < 1:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens; the context holds {self._n_ctx}"
            )
        max_tokens = min(request.max_tokens, room)
        stops = [s for s in (*request.stop, *template_stops) if s]
        if request.seed >= 0:
            llm.set_seed(request.seed)

        # A token may end inside a multi-byte character: the decoder holds those bytes back
        # until the character is whole, and a cut (max_tokens, stop) drops them unshown.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        pending = ""  # text held back while it might still turn into a stop string
        produced = 0
        finish = "length"
        if not self._read_prompt(prompt, should_stop):
            yield Chunk("", "cancelled", len(prompt), 0)
            return
        gen = llm.generate(
            prompt,
            temp=request.temperature,
            top_p=request.top_p,
            repeat_penalty=request.repeat_penalty,
            reset=True,
        )
        try:
            for token in gen:
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                pending += decoder.decode(llm.detokenize([token]))
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending = pending[:cut]
                    finish = "stop"
                    break
                keep = _stop_prefix_len(pending, stops)
                if len(pending) > keep:
                    emit = pending[: len(pending) - keep]
                    pending = pending[len(pending) - keep :]
                    yield Chunk(emit)
                if produced >= max_tokens:
                    finish = "length"
                    break
                if should_stop():
                    finish = "cancelled"
                    break
        finally:
            gen.close()
        yield Chunk(pending, finish, len(prompt), produced)

    def _read_prompt(self, prompt: list[int], should_stop: Callable[[], bool]) -> bool:
        """Read all but the prompt's last token into the KV cache, ``n_batch`` tokens at a time with
        a stop check between (shutdown, timeout, cancel); False when stopped first.

        ``Llama.generate`` reads the whole prompt in one uninterruptible call (a long prompt on a
        big model is tens of seconds). Read here, it finds the prompt cached but for its last
        token, which it reads itself to sample the first reply token. What the previous prompt
        shares with this one stays cached, as in ``generate``.
        """
        llm = self._llm
        cached = llm.input_ids[: llm.n_tokens]
        keep = 0
        for a, b in zip(cached, prompt[:-1], strict=False):
            if a != b:
                break
            keep += 1
        if keep < llm.n_tokens and not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
            llm.reset()
            llm._ctx.kv_cache_clear()
        llm.n_tokens = keep
        rest = prompt[keep:-1]
        step = max(1, llm.n_batch)
        for i in range(0, len(rest), step):
            if should_stop():
                return False
            llm.eval(rest[i : i + step])
        return not should_stop()


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
