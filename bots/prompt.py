"""Builds the prompt for one message: persona + as much recent history as fits + the message
(with the documents retrieved for it, which the history then keeps as they were shown).

Tokens are counted with the model's own tokenizer and chat template, so the budget
is exact: ``n_ctx`` = prompt + reply budget. History is dropped oldest-first, a whole
exchange at a time, so the kept part always starts with a user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.engines import PromptTokenizer
from core.errors import BotdError
from core.knowledge.retriever import Hit
from core.messages import ChatTurn


class InputTooLong(BotdError, ValueError):
    """System prompt + message + reply budget alone exceed the context window."""

    def __init__(self, needed: int, n_ctx: int) -> None:
        super().__init__(
            f"the message needs {needed} tokens with the reply budget, but the model's context holds {n_ctx}"
        )
        self.needed = needed
        self.n_ctx = n_ctx


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    messages: list[dict[str, Any]]
    prompt_tokens: int
    history_used: int
    history_dropped: int


class PromptBuilder:
    def __init__(self, tokenizer: PromptTokenizer, n_ctx: int) -> None:
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx

    def build(
        self, system: str | None, history: Sequence[ChatTurn], text: str, reply_budget: int,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> BuiltPrompt:
        """The most recent history that fits beside ``system``, ``text``, the tools' definitions
        and ``reply_budget``.

        History turns are rendered as the model saw them (a question with the documents it was
        given) while the whole thread fits, so the prompt extends the previous one token for
        token and the thread's KV state is reused. When it does not fit, earlier turns lose their
        documents first (the prefix is lost once, as with any cut), then whole exchanges go,
        oldest first."""
        head: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        tail: list[dict[str, Any]] = [{"role": "user", "content": text}]
        limit = self.n_ctx - reply_budget
        plain = [t.plain() for t in history]

        def render(turns: Sequence[ChatTurn], k: int) -> tuple[list[dict[str, Any]], int]:
            kept: list[dict[str, Any]] = [t.for_model() for t in turns[len(turns) - k :]] if k else []
            msgs = head + kept + tail
            return msgs, self.tokenizer.count_chat(msgs, tools)

        # Most turns fit whole: one count (each is a full tokenization, ~10 ms for 2k tokens).
        cuts = [k for k in range(1, len(history) + 1) if history[len(history) - k].role == "user"]
        if cuts:
            for turns in (history, plain) if plain != list(history) else (history,):
                whole = render(turns, cuts[-1])
                if whole[1] <= limit:
                    return BuiltPrompt(whole[0], whole[1], cuts[-1], len(history) - cuts[-1])
        msgs, n = render(plain, 0)
        if n > limit:
            raise InputTooLong(n + reply_budget, self.n_ctx)
        # Candidate cut points (above): keep the last k turns where the kept part starts with a user turn.
        best_k, best = 0, (msgs, n)
        lo, hi = 0, len(cuts) - 1
        while lo <= hi:  # token count grows with k: binary search the largest k that fits
            mid = (lo + hi) // 2
            cand = render(plain, cuts[mid])
            if cand[1] <= limit:
                best_k, best = cuts[mid], cand
                lo = mid + 1
            else:
                hi = mid - 1
        return BuiltPrompt(best[0], best[1], best_k, len(history) - best_k)

    def given(self, system: str | None, messages: Sequence[dict[str, Any]], reply_budget: int,
              tools: Sequence[dict[str, Any]] | None = None) -> BuiltPrompt:
        """A client's own conversation (with its tool calls and results), as given: nothing is
        cut from it, so it must fit whole."""
        msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
        n = self.tokenizer.count_chat(msgs, tools)
        if n > self.n_ctx - reply_budget:
            raise InputTooLong(n + reply_budget, self.n_ctx)
        return BuiltPrompt(msgs, n, len(messages) - 1, 0)


# The rules stay in the system prompt, the same for every turn; the documents come with the
# question that retrieved them (see with_documents). Retrieved chunks at the top of the prompt
# changed with every question and made each turn re-read the whole thread.
KNOWLEDGE_RULES = (
    "A question may come with documents, numbered [1], [2], ... "
    "Answer from those documents when they hold the answer, and say which document you used. "
    "If they do not hold the answer, say that you have no document on it; do not invent one."
)


# A bot without knowledge bases, in a thread where files were sent: the same numbering and citing,
# without the refusal (what its files do not hold it answers as it always did).
FILE_RULES = (
    "A question may come with documents the user sent, numbered [1], [2], ... "
    "Answer from those documents when they hold the answer, and say which document you used."
)


def with_rules(system: str | None, rules: str = KNOWLEDGE_RULES) -> str:
    """A knowledge bot's system prompt: its persona and the rules for answering from documents."""
    return f"{system or ''}\n\n{rules}".lstrip()


def with_documents(text: str, hits: Sequence[Hit]) -> str:
    """The user's turn as the model is given it: the retrieved chunks, each headed by its
    source, then the question."""
    if not hits:
        return text
    docs = "\n\n".join(f"[{i}] {h.cite}\n{h.text}" for i, h in enumerate(hits, start=1))
    return f"Documents:\n\n{docs}\n\nQuestion: {text}"


def fit_documents(tokenizer: PromptTokenizer, hits: Sequence[Hit], budget: int) -> list[Hit]:
    """The best chunks, in order, while their tokens stay within ``budget`` (blocking)."""
    if not hits:
        return []
    empty = tokenizer.count_chat([{"role": "user", "content": ""}])
    used: list[Hit] = []
    for h in hits:
        n = tokenizer.count_chat([{"role": "user", "content": with_documents("", [*used, h])}]) - empty
        if n > budget:
            break
        used.append(h)
    return used
