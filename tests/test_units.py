"""Small parts on their own: the think filter, the fair queue, the prompt builder, secrets."""

from __future__ import annotations

import asyncio

import pytest

from bots.commands import parse_command
from bots.prompt import InputTooLong, PromptBuilder
from core.config import embedded_model_path
from core.engines.base import GenerationRequest
from core.engines.llamacpp import LlamaCppTokenizer
from core.jobs import FairQueue, Job, QueueFull
from core.messages import ChatTurn, ThreadKey
from core.secrets import SecretError, resolve_secret
from core.thinking import ThinkFilter


def run_filter(pieces: list[str]) -> str:
    f = ThinkFilter()
    return "".join(f.feed(p) for p in pieces) + f.flush()


@pytest.mark.parametrize("pieces, expected", [
    (["<think>plan</think>Hello"], "Hello"),
    (["<th", "ink>pl", "an</th", "ink>\n\nHel", "lo"], "Hello"),
    (["Hi <", "think>x</think> there"], "Hi  there"),
    (["a < b and c > d"], "a < b and c > d"),
    (["<thinking is fun"], "<thinking is fun"),
    (["<think>never closed"], ""),
    (["2 <", "3"], "2 <3"),
    (["x<", "/think>"], "x</think>"),
])
def test_think_filter(pieces, expected):
    assert run_filter(pieces) == expected


def test_think_filter_keeps_the_models_own_leading_whitespace_for_the_history():
    f = ThinkFilter()
    assert f.feed("\n") + f.feed("\n Hello") + f.flush() == "Hello"
    assert f.dropped_lead == "\n\n "  # the history keeps what the model produced
    f = ThinkFilter()
    assert f.feed("<think>x</think>\n\nHi") + f.flush() == "Hi"
    assert f.dropped_lead == ""  # whitespace after a removed block is not the answer's


async def test_job_strips_thinking_from_stream_and_final_text():
    req = GenerationRequest(ThreadKey("t", "b", "c"), [], 10)
    job = Job(user="u", request=req)
    for piece in ["<thi", "nk>secret</think>", "Visible ", "answer"]:
        job.push_text(piece)
    job.finish("stop")
    events = [ev async for ev in job.events()]
    assert "".join(e.delta for e in events) == "Visible answer"
    assert events[-1].text == "Visible answer"
    kept = Job(user="u", request=req, keep_thinking=True)
    kept.push_text("<think>x</think>y")
    kept.finish("stop")
    assert kept.text == "<think>x</think>y"


def _job(user: str) -> Job:
    return Job(user=user, request=GenerationRequest(ThreadKey("t", "b", user), [], 5))


async def test_fair_queue_round_robin_and_bounds():
    q = FairQueue(max_size=5, per_user=3, retry_after_s=9)
    a = [_job("a") for _ in range(3)]
    for j in a:
        q.put_nowait(j)
    with pytest.raises(QueueFull) as exc:
        q.put_nowait(_job("a"))
    assert exc.value.per_user and exc.value.retry_after == 9
    b = _job("b")
    c = _job("c")
    q.put_nowait(b)
    q.put_nowait(c)
    with pytest.raises(QueueFull) as exc:
        q.put_nowait(_job("d"))
    assert not exc.value.per_user
    got = [await q.get() for _ in range(5)]
    assert got == [a[0], b, c, a[1], a[2]]
    assert len(q) == 0
    # per-user places come back only when jobs finish
    with pytest.raises(QueueFull):
        q.put_nowait(_job("a"))
    q.release(a[0])
    q.put_nowait(_job("a"))


async def test_fair_queue_remove_and_wait():
    q = FairQueue(max_size=3, per_user=3)
    j = _job("a")
    q.put_nowait(j)
    assert q.remove(j) and len(q) == 0 and not q.remove(j)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    k = _job("b")
    q.put_nowait(k)
    assert await asyncio.wait_for(getter, 1) is k


@pytest.fixture(scope="module")
def tokenizer():
    return LlamaCppTokenizer(embedded_model_path())


def test_prompt_builder_keeps_the_most_recent_whole_exchanges(tokenizer):
    history = []
    for i in range(40):
        history += [ChatTurn("user", f"question {i} " * 10), ChatTurn("assistant", f"answer {i} " * 10)]
    builder = PromptBuilder(tokenizer, n_ctx=600)
    built = builder.build("Be brief.", history, "And now?", reply_budget=100)
    assert built.prompt_tokens + 100 <= 600
    assert built.prompt_tokens == tokenizer.count_chat(built.messages)
    kept = built.messages[1:-1]
    assert kept[0]["role"] == "user"
    assert kept[-1]["content"] == history[-1].content
    assert built.history_used + built.history_dropped == len(history)
    # one more exchange would not have fitted
    more = [history[len(history) - built.history_used - 2].as_dict(),
            history[len(history) - built.history_used - 1].as_dict()]
    assert tokenizer.count_chat([built.messages[0], *more, *built.messages[1:]]) + 100 > 600


def test_prompt_builder_refuses_what_cannot_fit(tokenizer):
    builder = PromptBuilder(tokenizer, n_ctx=300)
    with pytest.raises(InputTooLong):
        builder.build("sys", [], "word " * 400, reply_budget=50)
    built = builder.build("sys", [ChatTurn("user", "x " * 500), ChatTurn("assistant", "y")], "hi", 50)
    assert built.history_used == 0 and built.history_dropped == 2


def test_secrets_resolve_from_env_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("BOTD_T", "abc")
    assert resolve_secret("env:BOTD_T") == "abc"
    f = tmp_path / "key"
    f.write_text("fromfile\n")
    assert resolve_secret(f"file:{f}") == "fromfile"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_secret("cred:key") == "fromfile"
    with pytest.raises(SecretError) as exc:
        resolve_secret("env:BOTD_NOPE")
    assert "BOTD_NOPE" in str(exc.value)


def test_commands():
    assert parse_command("/reset").name == "reset"
    assert parse_command("/help@MyBot", "mybot").name == "help"
    assert parse_command("/help@OtherBot", "mybot") is None
    assert parse_command("/unknown") is None
    assert parse_command("hello /reset") is None
