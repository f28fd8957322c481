"""Feedback on answers end to end: a 👍 / 👎 through each platform's real SDK (or the console's
real HTTP) against its fake, into the real daemon with the real model and a real knowledge base,
lands on the right stored answer with its chunk ids; forged and replayed feedback is refused; a
👎's reason is stored; the answer the user has is unchanged; feedback off shows no buttons."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from core.config import Config
from core.feedback import FeedbackRecord, Vote
from core.messages import ThreadKey
from tests.fakes import FakeTelegram, serve
from tests.helpers import Client, make_config, running_daemon, wait_for

QUESTION = "How many days of annual leave do I get?"
_ids = iter(range(5000, 100000))


def knowledge(tmp_path: Path) -> dict[str, Any]:
    """The bot "assistant" answering from a small HR base (so answers have chunks to cite)."""
    docs = tmp_path / "docs" / "hr"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "leave.md").write_text("# Annual leave\n\nEvery employee gets 25 days of annual leave a year.\n")
    return {"bots": {"assistant": {"knowledge": ["hr"], "no_match": "answer"}},
            "knowledge": {"hr": {"paths": [str(docs)], "schedule": ""}}}


def config(tmp_path: Path, redis_url: str, feedback: bool = True, **sections: Any) -> Config:
    data = knowledge(tmp_path)
    data["bots"]["assistant"]["feedback"] = feedback
    return make_config(tmp_path, redis_url, model={"max_tokens": 8}, **data, **sections)


async def until(pred: Any, timeout: float = 120) -> None:
    async def check() -> bool:
        return bool(pred())
    await wait_for(check, timeout=timeout)


async def ready(api: Client) -> None:
    """The HR base is built (a question asked earlier is answered "still loading")."""
    await until(lambda: api.daemon.runtime.knowledge_state.get("hr") == "ready", 300)


async def record(api: Client, answer_id: str) -> FeedbackRecord:
    rec = await api.daemon.runtime.feedback.get(answer_id)
    assert rec is not None
    return rec


def check_facts(rec: FeedbackRecord, platform: str, history_answer: str) -> None:
    f = rec.facts
    assert (f.platform, f.bot, f.bases, f.question) == (platform, "assistant", ("hr",), QUESTION)
    assert f.answer.strip() and f.answer.strip() in history_answer
    assert f.chunks and f.chunks[0].id.startswith("hr:") and "leave.md#" in f.chunks[0].id
    assert f.chunks[0].score > 0 and f.model and f.latency_ms > 0


def history(redis_server: Any, platform: str, chat: str, thread: str = "") -> list[dict[str, Any]]:
    key = "botd:hist:" + ThreadKey(platform, "assistant", chat, thread).redis_suffix()
    return [json.loads(x) for x in redis_server.client().lrange(key, 0, -1)]


# -- Telegram: inline keyboard, callback queries ------------------------------------------------------------

TG_SECRET = "wh-secret_123"
TG_USER = {"id": 4242, "is_bot": False, "first_name": "Ada"}


@pytest.fixture
def tg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_TOKEN", "999000:TEST-token")
    monkeypatch.setenv("TG_SECRET", TG_SECRET)


def tg_section(base: str) -> dict[str, Any]:
    return {"assistant": {"token": "env:TG_TOKEN", "mode": "webhook", "api_base": base + "/bot",
                          "webhook_secret": "env:TG_SECRET", "edit_interval_private_s": 0.3}}


async def tg_post(api: Client, update: dict[str, Any], secret: str | None = TG_SECRET) -> int:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    async with api.session.post(f"{api.base}/telegram/assistant", data=json.dumps(update).encode(),
                                headers=headers) as r:
        return r.status


def tg_message(text: str, chat_id: int = 4242, reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
    uid = next(_ids)
    msg = {"message_id": uid, "date": int(time.time()), "text": text, "from": TG_USER,
           "chat": {"id": chat_id, "type": "private", "first_name": "Ada"}}
    if reply_to is not None:
        msg["reply_to_message"] = reply_to
    return {"update_id": uid, "message": msg}


def tg_press(fake: FakeTelegram, message_id: int, data: str, query_id: str, chat_id: int = 4242) -> dict[str, Any]:
    shown = dict(fake.messages[message_id])
    message = {**shown, "from": FakeTelegram.BOT, "chat": {"id": chat_id, "type": "private", "first_name": "Ada"}}
    message.pop("sent_markup", None)
    return {"update_id": next(_ids), "callback_query": {"id": query_id, "from": TG_USER, "chat_instance": "ci-1",
                                                         "data": data, "message": message}}


async def test_telegram_votes_land_on_the_stored_answer_and_forgeries_are_refused(tmp_path, redis_server, tg_env):
    fake = FakeTelegram()
    async with serve(fake.app()) as base, \
            running_daemon(config(tmp_path, redis_server.url, telegram=tg_section(base))) as api:
        await ready(api)
        assert await tg_post(api, tg_message(QUESTION)) == 200
        await until(lambda: fake.of("editMessageReplyMarkup"))
        markup = fake.of("editMessageReplyMarkup")[-1]
        mid = int(markup["message_id"])
        shown = fake.messages[mid]["text"]
        keys = json.loads(markup["reply_markup"])["inline_keyboard"][0]
        assert [k["text"] for k in keys] == ["👍 Helpful", "👎 Not helpful"]
        up, down = keys[0]["callback_data"], keys[1]["callback_data"]
        answer_id = up.split(":")[1]
        rec = await record(api, answer_id)
        check_facts(rec, "telegram", history(redis_server, "telegram", "4242")[1]["content"])
        assert rec.facts.chat == "4242" and rec.votes == {}

        # A forged update (no secret, or the wrong one) never reaches the store.
        assert await tg_post(api, tg_press(fake, mid, up, "forged-1"), secret=None) == 401
        assert await tg_post(api, tg_press(fake, mid, up, "forged-2"), secret="nope") == 401
        # A press that names the answer from another chat is refused.
        assert await tg_post(api, tg_press(fake, mid, up, "q-other", chat_id=777)) == 200
        await asyncio.sleep(0.3)
        assert (await record(api, answer_id)).votes == {}

        # 👎: stored; Telegram is answered (the spinner stops) and a "what was wrong?" prompt follows.
        sent_before = len(fake.of("sendMessage"))
        assert await tg_post(api, tg_press(fake, mid, down, "q-1")) == 200
        await until(lambda: len(fake.of("sendMessage")) == sent_before + 1)
        assert (await record(api, answer_id)).votes == {"4242": Vote.DOWN}
        assert fake.of("answerCallbackQuery")[-1]["callback_query_id"] == "q-1"
        prompt = fake.messages[max(fake.messages)]
        assert "What was wrong?" in prompt["text"] and prompt["sent_markup"]["force_reply"] is True
        # Then 👍 (a changed mind), and a replay of the 👎's callback: refused, the 👍 stands.
        assert await tg_post(api, tg_press(fake, mid, up, "q-2")) == 200
        await until(lambda: len(fake.of("answerCallbackQuery")) >= 3)
        assert await tg_post(api, tg_press(fake, mid, down, "q-1")) == 200
        await until(lambda: len(fake.of("answerCallbackQuery")) >= 4)
        assert (await record(api, answer_id)).votes == {"4242": Vote.UP}
        day = (await api.daemon.runtime.feedback.daily(bot="assistant", days=1))[-1]
        assert (day.answers, day.up, day.down) == (1, 1, 0)

        # The reply to the prompt is the reason: stored, thanked, not answered as a question.
        prompt_msg = {**prompt, "from": FakeTelegram.BOT, "chat": {"id": 4242, "type": "private"}}
        prompt_msg.pop("sent_markup", None)
        assert await tg_post(api, tg_message("It should say 25 days", reply_to=prompt_msg)) == 200
        await until(lambda: any("Reason noted" in m["text"] for m in fake.messages.values()))
        rec = await record(api, answer_id)
        assert [r.text for r in rec.reasons] == ["It should say 25 days"]
        assert len(history(redis_server, "telegram", "4242")) == 2  # no second exchange
        # The answer's text was never touched by any of it.
        assert fake.messages[mid]["text"] == shown
        after = [m for m, _, _ in fake.calls][[m for m, _, _ in fake.calls].index("editMessageReplyMarkup"):]
        assert "editMessageText" not in after


async def test_telegram_feedback_off_shows_no_buttons(tmp_path, redis_server, tg_env):
    fake = FakeTelegram()
    async with serve(fake.app()) as base, \
            running_daemon(config(tmp_path, redis_server.url, feedback=False, telegram=tg_section(base))) as api:
        await ready(api)
        assert await tg_post(api, tg_message(QUESTION)) == 200
        await until(lambda: len(history(redis_server, "telegram", "4242")) == 2)
        await asyncio.sleep(1.0)
        assert fake.of("editMessageReplyMarkup") == []
        assert all("reply_markup" not in m for m in fake.messages.values())
        assert await api.daemon.runtime.feedback.answers(bot="assistant") == []  # nothing stored either
