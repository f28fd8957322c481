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
from urllib.parse import urlencode

import aiohttp
import pytest
from slack_sdk.signature import SignatureVerifier

from connectors.feishu.callback import encrypt as lark_encrypt
from connectors.feishu.callback import signature as lark_signature
from core.config import Config
from core.feedback import FeedbackRecord, Vote
from core.messages import ThreadKey
from tests.fake_dingtalk import FakeDingtalk
from tests.fake_feishu import FakeFeishu
from tests.fake_wecom_aibot import CallbackSender, FakeAibot, event_body
from tests.fakes import FakeSlack, FakeTelegram, serve
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


# -- Slack: Block Kit buttons, signed interactivity payloads --------------------------------------------------

SLACK_SIGNING = "test-signing-secret-0123456789"


@pytest.fixture
def slack_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SLACK_SIGNING)


def slack_section(base: str) -> dict[str, Any]:
    return {"assistant": {"bot_token": "env:SLACK_BOT_TOKEN", "mode": "http", "api_base": base + "/api/",
                          "signing_secret": "env:SLACK_SIGNING_SECRET", "update_interval_s": 0.3}}


async def slack_post(api: Client, body: str, content_type: str, *, secret: str = SLACK_SIGNING,
                     ts: float | None = None) -> int:
    stamp = str(int(ts if ts is not None else time.time()))
    sig = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": sig}
    async with api.session.post(f"{api.base}/slack/events", data=body.encode(), headers=headers) as r:
        return r.status


def slack_mention(text: str, ts: str) -> str:
    return json.dumps({"token": "x", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
                       "event_id": f"Ev{ts}", "event_time": int(time.time()),
                       "event": {"type": "app_mention", "user": "U123", "text": f"<@UBOT> {text}", "ts": ts,
                                 "channel": "C1"}})


def slack_action(action: dict[str, Any], trigger: str, channel: str = "C1", message_ts: str = "") -> str:
    payload = {"type": "block_actions", "team": {"id": "T1"}, "user": {"id": "U123", "team_id": "T1"},
               "api_app_id": "A1", "token": "x", "trigger_id": trigger, "channel": {"id": channel},
               "container": {"type": "message", "message_ts": message_ts, "channel_id": channel},
               "message": {"ts": message_ts, "thread_ts": message_ts}, "actions": [action]}
    return urlencode({"payload": json.dumps(payload)})


FORM = "application/x-www-form-urlencoded"


async def test_slack_signed_actions_land_on_the_stored_answer_and_forgeries_are_refused(tmp_path, redis_server,
                                                                                        slack_env):
    fake = FakeSlack()
    async with serve(fake.app()) as base:
        fake.base = base
        async with running_daemon(config(tmp_path, redis_server.url, slack=slack_section(base))) as api:
            await ready(api)
            root = f"{int(time.time())}.000100"
            assert await slack_post(api, slack_mention(QUESTION, root), "application/json") == 200
            await until(lambda: any(m.get("blocks") for m in fake.posted.values()))
            ts, msg = next((t, m) for t, m in fake.posted.items() if m.get("blocks"))
            actions = msg["blocks"][-1]
            up, down = actions["elements"]
            assert [b["text"]["text"] for b in (up, down)] == ["👍 Helpful", "👎 Not helpful"]
            answer_id = up["value"]
            # The same text as before the buttons, shown as the same mrkdwn.
            update = [u for u in fake.of("chat.update") if "blocks" in u][-1]
            previous = [u for u in fake.of("chat.update") if "blocks" not in u][-1]
            assert update["text"] == previous["text"] == msg["text"]
            assert "".join(b["text"]["text"] for b in msg["blocks"][:-1]) == msg["text"]
            rec = await record(api, answer_id)
            check_facts(rec, "slack", history(redis_server, "slack", "C1", root)[1]["content"])

            def press(button: dict[str, Any], trigger: str, **kw: Any) -> str:
                return slack_action({"type": "button", "action_id": button["action_id"], "value": button["value"],
                                     "block_id": "botd_feedback", "action_ts": str(time.time())}, trigger,
                                    message_ts=ts, **kw)

            # Forged: signed with another secret; replayed past Slack's five minutes: refused before any work.
            assert await slack_post(api, press(up, "t-forged"), FORM, secret="not-the-secret") == 401
            assert await slack_post(api, press(up, "t-old"), FORM, ts=time.time() - 600) == 401
            # Signed, but naming the answer from another channel: refused by the store.
            assert await slack_post(api, press(up, "t-other", channel="C999"), FORM) == 200
            assert (await record(api, answer_id)).votes == {}

            # 👎: stored, and the user alone is asked for a reason (an input that sends its text).
            body = press(down, "t-1")
            assert await slack_post(api, body, FORM) == 200
            await until(lambda: fake.of("chat.postEphemeral"))
            assert (await record(api, answer_id)).votes == {"U123": Vote.DOWN}
            asked = fake.of("chat.postEphemeral")[-1]
            assert asked["user"] == "U123" and "What was wrong?" in asked["text"]
            blocks = asked["blocks"] if isinstance(asked["blocks"], list) else json.loads(asked["blocks"])
            field = blocks[0]
            # The same signed request again (within the five minutes): refused as a replay.
            assert await slack_post(api, press(up, "t-2"), FORM) == 200
            assert await slack_post(api, body, FORM) == 200
            await asyncio.sleep(0.3)
            assert (await record(api, answer_id)).votes == {"U123": Vote.UP}

            # The reason, sent from the field.
            reason = slack_action({"type": "plain_text_input", "action_id": "botd_feedback_reason",
                                   "block_id": field["block_id"], "value": "The number of days is missing",
                                   "action_ts": str(time.time())}, "t-3", message_ts=ts)
            assert await slack_post(api, reason, FORM) == 200
            await until(lambda: any("Reason noted" in e["text"] for e in fake.of("chat.postEphemeral")))
            assert [r.text for r in (await record(api, answer_id)).reasons] == ["The number of days is missing"]
            # The answer's text never changed, and no question was answered from the feedback.
            assert fake.posted[ts]["text"] == msg["text"]
            assert len(history(redis_server, "slack", "C1", root)) == 2


# -- WeCom AI bot: the stream's feedback id, feedback_event ----------------------------------------------------

AIBOT_TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AIBOT_AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"


@pytest.fixture
def aibot_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WECOM_AIBOT_SECRET", "aibot-long-secret")
    monkeypatch.setenv("WECOM_AIBOT_TOKEN", AIBOT_TOKEN)
    monkeypatch.setenv("WECOM_AIBOT_AES_KEY", AIBOT_AES_KEY)


def feedback_event(fid: str, kind: int, content: str = "", reasons: list[int] | None = None) -> dict[str, Any]:
    fb: dict[str, Any] = {"id": fid, "type": kind}
    if content:
        fb["content"] = content
    if reasons:
        fb["inaccurate_reason_list"] = reasons
    return {"eventtype": "feedback_event", "feedback_event": fb}


async def test_wecom_aibot_feedback_events_land_on_the_stored_answer(tmp_path, redis_server, aibot_env):
    fake = FakeAibot()
    async with serve(fake.app()) as base:
        fake.url = base
        section = {"assistant": {"mode": "websocket", "bot_id": fake.bot_id, "secret": "env:WECOM_AIBOT_SECRET",
                                 "ws_url": fake.ws_url, "update_interval_s": 0.1, "heartbeat_s": 1}}
        async with running_daemon(config(tmp_path, redis_server.url, wecom_aibot=section)) as api:
            await ready(api)
            await until(lambda: fake.connected())
            await fake.send_message("zhangsan", QUESTION, msgid="m-1")
            await until(lambda: any(s.finished for s in fake.streams.values()))
            [st] = fake.streams.values()
            assert st.feedback  # WeCom shows its 👍 / 👎 under this stream
            rec = await record(api, st.feedback)
            check_facts(rec, "wecom_aibot", history(redis_server, "wecom_aibot", "zhangsan")[1]["content"])
            shown = st.content

            # 👎 with the reasons WeCom offers and the user's words.
            await fake.send_event("zhangsan", feedback_event(st.feedback, 2, "少了天数", [2]), msgid="ev-1")
            await wait_for(lambda: _voted(api, st.feedback, {"zhangsan": Vote.DOWN}))
            rec = await record(api, st.feedback)
            assert [r.text for r in rec.reasons] == ["内容不完整 / incomplete; 少了天数"]
            # Someone else, in another chat, naming this answer: refused.
            await fake.send_event("lisi", feedback_event(st.feedback, 1), msgid="ev-2")
            # 👍 instead, then the 👎's event delivered again: a replay, refused.
            await fake.send_event("zhangsan", feedback_event(st.feedback, 1), msgid="ev-3")
            await wait_for(lambda: _voted(api, st.feedback, {"zhangsan": Vote.UP}))
            await fake.send_event("zhangsan", feedback_event(st.feedback, 2, "少了天数", [2]), msgid="ev-1")
            # Withdrawn (WeCom's type 3).
            await fake.send_event("zhangsan", feedback_event(st.feedback, 3), msgid="ev-4")
            await wait_for(lambda: _voted(api, st.feedback, {}))
            assert len((await record(api, st.feedback)).reasons) == 1
            # The stream the user read was finished once and never touched again.
            assert st.content == shown and fake.errors == []


async def _voted(api: Client, answer_id: str, votes: dict[str, Vote]) -> bool:
    return (await record(api, answer_id)).votes == votes


async def test_wecom_aibot_callback_feedback_is_signed_and_not_replayed(tmp_path, redis_server, aibot_env):
    fake = FakeAibot()
    async with serve(fake.app()) as base:
        fake.url = base
        section = {"assistant": {"mode": "callback", "token": "env:WECOM_AIBOT_TOKEN",
                                 "encoding_aes_key": "env:WECOM_AIBOT_AES_KEY", "update_interval_s": 0.1}}
        async with running_daemon(config(tmp_path, redis_server.url, wecom_aibot=section)) as api, \
                aiohttp.ClientSession() as session:
            await ready(api)
            sender = CallbackSender(fake, session, f"{api.base}/wecom_aibot/assistant", AIBOT_TOKEN, AIBOT_AES_KEY,
                                    refresh_every_s=0.1)
            st = await sender.converse("wangwu", QUESTION, "cb-1")
            assert st is not None and st.finished
            fids = {p["stream"].get("feedback", {}).get("id") for p in sender.passive}
            assert len(fids) == 1 and None not in fids  # every frame of the stream carries it
            [fid] = fids
            rec = await record(api, fid)
            check_facts(rec, "wecom_aibot", history(redis_server, "wecom_aibot", "wangwu")[1]["content"])

            down = event_body(fake.bot_id, "wangwu", feedback_event(fid, 2), msgid="cb-ev-1")
            # Forged: a wrong signature is refused before anything is decrypted; nothing is stored.
            status, _ = await sender.post(down, msg_signature="0" * 40)
            assert status == 403
            # Signed at a time outside the window (a recorded callback replayed later): refused.
            status, _ = await sender.post(down, ts=str(int(time.time()) - 7200))
            assert status != 200
            assert (await record(api, fid)).votes == {}
            status, reply = await sender.post(down)
            assert status == 200 and reply is None  # WeCom expects no answer to an event
            assert (await record(api, fid)).votes == {"wangwu": Vote.DOWN}
            status, _ = await sender.post(event_body(fake.bot_id, "wangwu", feedback_event(fid, 1), msgid="cb-ev-2"))
            # The 👎 callback again, freshly signed (same msgid): a replay, refused.
            status, _ = await sender.post(down)
            assert status == 200
            assert (await record(api, fid)).votes == {"wangwu": Vote.UP}


# -- the web console's chat ------------------------------------------------------------------------------------


async def test_console_votes_land_on_the_askers_own_answer(tmp_path, redis_server, monkeypatch):
    from tests.test_console import HR_FACT, _signing_key, browsers, console_config  # noqa: F401 - fixture

    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", "console-signing-key-for-the-tests-0123456789")
    cfg = console_config(tmp_path, redis_server.url, knowledge=True, model={"max_tokens": 8})
    bots = {**cfg.bots, "it": cfg.bots["it"].model_copy(update={"feedback": False})}
    cfg = cfg.model_copy(update={"bots": bots})
    async with running_daemon(cfg) as api, browsers(api, "alice", "ivan", "root") as (alice, ivan, root):
        await until(lambda: all(api.daemon.runtime.knowledge_state.get(k) == "ready" for k in ("hr", "it")), 300)
        status, events, _ = await alice.chat("hr", "How much is the parental leave bonus?", max_tokens=8)
        assert status == 200
        done = events[-1]
        answer_id = done["feedback"]
        assert answer_id and done["complete"]
        shown = "".join(e.get("delta", "") for e in events)
        rec = await record(api, answer_id)
        f = rec.facts
        assert (f.platform, f.bot, f.bases, f.chat, f.user) == ("web", "hr", ("hr",), "alice/c1", "alice")
        assert f.chunks and f.chunks[0].id.startswith("hr:hr-policy.md#") and f.answer.strip() in shown

        # Without the login's CSRF token: refused; naming alice's answer from another login: refused.
        vote = {"answer": answer_id, "conversation": "c1", "vote": "down"}
        assert (await alice.post("/api/feedback", csrf=False, json=vote))[0] == 403
        assert (await root.post("/api/feedback", json=vote))[0] == 404
        assert (await alice.post("/api/feedback", json={**vote, "vote": "maybe"}))[0] == 400
        assert (await record(api, answer_id)).votes == {}
        status, body = await alice.post("/api/feedback", json=vote)
        assert status == 200 and body["ask_reason"] is True
        status, body = await alice.post("/api/feedback", json={**vote, "vote": None, "reason": "The amount is wrong"})
        assert status == 200
        rec = await record(api, answer_id)
        assert rec.votes == {"alice": Vote.DOWN} and [r.text for r in rec.reasons] == ["The amount is wrong"]

        # A bot with feedback off: the answer comes without the id the buttons need, and nothing is stored.
        status, events, _ = await ivan.chat("it", "How often does the VPN password rotate?", max_tokens=8)
        assert status == 200 and events[-1]["feedback"] is None
        assert await api.daemon.runtime.feedback.answers(bot="it") == []


# -- Feishu: buttons appended to the answer's card, card.action.trigger --------------------------------------------

LARK_KEY, LARK_TOKEN = "test key", "vtoken"


def lark_signed(event: dict[str, Any], key: str = LARK_KEY, ts: float | None = None) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"encrypt": lark_encrypt(json.dumps(event).encode(), key, b"0123456789abcdef")}).encode()
    stamp, nonce = str(int(ts if ts is not None else time.time())), "n1"
    return {"X-Lark-Request-Timestamp": stamp, "X-Lark-Request-Nonce": nonce,
            "X-Lark-Signature": lark_signature(stamp, nonce, key, body), "Content-Type": "application/json"}, body


def card_press(fake: FakeFeishu, value: dict[str, Any], user: str, event_id: str) -> dict[str, Any]:
    return {"schema": "2.0", "header": {"event_id": event_id, "event_type": "card.action.trigger",
                                        "create_time": str(int(time.time() * 1000)), "token": LARK_TOKEN,
                                        "app_id": fake.app_id, "tenant_key": "tk"},
            "event": {"operator": {"open_id": f"ou_{user}", "union_id": f"on_{user}"}, "token": "c-1",
                      "action": {"value": value, "tag": "button"}, "host": "im_message",
                      "context": {"open_message_id": "om_x", "open_chat_id": f"oc_p2p_{user}"}}}


async def lark_post(api: Client, event: dict[str, Any], **kw: Any) -> tuple[int, Any]:
    headers, body = lark_signed(event, **kw)
    async with api.session.post(f"{api.base}/feishu/assistant", data=body, headers=headers) as r:
        return r.status, json.loads(await r.text() or "null") if r.status == 200 else None


async def test_feishu_card_buttons_land_on_the_stored_answer(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("FEISHU_SECRET", "feishu-app-secret")
    monkeypatch.setenv("FEISHU_ENCRYPT_KEY", LARK_KEY)
    monkeypatch.setenv("FEISHU_VERIFICATION_TOKEN", LARK_TOKEN)
    fake = FakeFeishu()
    async with serve(fake.app()) as base:
        fake.url = base
        section = {"assistant": {"mode": "callback", "app_id": fake.app_id, "app_secret": "env:FEISHU_SECRET",
                                 "api_base": base, "encrypt_key": "env:FEISHU_ENCRYPT_KEY",
                                 "verification_token": "env:FEISHU_VERIFICATION_TOKEN", "streaming": "cardkit",
                                 "update_interval_s": 0.3}}
        async with running_daemon(config(tmp_path, redis_server.url, feishu=section)) as api:
            await ready(api)
            assert (await lark_post(api, fake.message_event("boss", QUESTION)))[0] == 200
            await until(lambda: any(len(c.card["body"]["elements"]) > 1 for c in fake.cards.values()))
            [card] = fake.cards.values()
            text, buttons = card.card["body"]["elements"]
            up, down = (col["elements"][0] for col in buttons["columns"])
            assert [b["text"]["content"] for b in (up, down)] == ["👍 Helpful", "👎 Not helpful"]
            answer_id = up["behaviors"][0]["value"]["botd_feedback"]
            rec = await record(api, answer_id)
            check_facts(rec, "feishu", history(redis_server, "feishu", "ou_boss")[1]["content"])
            shown = card.content

            down_value = down["behaviors"][0]["value"]
            # Forged (another key) or stale (a recorded press replayed later): refused before any work.
            assert (await lark_post(api, card_press(fake, down_value, "boss", "e-f"), key="other key"))[0] == 403
            assert (await lark_post(api, card_press(fake, down_value, "boss", "e-o"), ts=time.time() - 3600))[0] == 403
            # Pressed by someone else (a forwarded card, another chat): refused.
            assert (await lark_post(api, card_press(fake, down_value, "clerk", "e-c")))[0] == 200
            assert (await record(api, answer_id)).votes == {}
            status, toast = await lark_post(api, card_press(fake, down_value, "boss", "e-1"))
            assert status == 200 and "Thanks" in toast["toast"]["content"]
            assert (await record(api, answer_id)).votes == {"ou_boss": Vote.DOWN}
            assert (await lark_post(api, card_press(fake, up["behaviors"][0]["value"], "boss", "e-2")))[0] == 200
            # The 👎's event delivered again (Feishu pushes again when unanswered): a replay, refused.
            assert (await lark_post(api, card_press(fake, down_value, "boss", "e-1")))[0] == 200
            assert (await record(api, answer_id)).votes == {"ou_boss": Vote.UP}
            # The answer's text element is as it was; the buttons sit below it.
            assert card.content == shown and text["element_id"] != "botd_feedback"
            # Another kind of event (the bot added to a group) is logged and answered 200, not 500
            # ("event" is structlog's own argument name: the log line itself raised).
            other = card_press(fake, {}, "boss", "e-3")
            other["header"]["event_type"] = "im.chat.member.bot.added_v1"
            assert (await lark_post(api, other))[0] == 200
            assert fake.errors == []


# -- DingTalk: the AI card's template buttons, card callbacks over the stream ---------------------------------------


async def test_dingtalk_card_buttons_land_on_the_stored_answer(tmp_path, redis_server, monkeypatch):
    monkeypatch.setenv("DINGTALK_SECRET", "dingtalk-app-secret")
    fake = FakeDingtalk()
    async with serve(fake.app()) as base:
        fake.url = base
        section = {"assistant": {"client_id": fake.client_id, "client_secret": "env:DINGTALK_SECRET",
                                 "api_base": base, "oapi_base": base, "card_template_id": "tpl-ai-card.schema",
                                 "update_interval_s": 0.3}}
        async with running_daemon(config(tmp_path, redis_server.url, dingtalk=section)) as api:
            await ready(api)
            await until(lambda: fake.connected() == 1)
            assert {"type": "CALLBACK", "topic": "/v1.0/card/instances/callback"} in fake.opens[-1]["subscriptions"]
            await fake.push(fake.robot_message("zhangsan", QUESTION))
            await until(lambda: any(c.finalised and c.params.get("botd_feedback") for c in fake.cards.values()))
            [card] = fake.cards.values()
            answer_id = card.params["botd_feedback"]
            assert (card.params["botd_feedback_up"], card.params["botd_feedback_down"]) == ("👍 Helpful",
                                                                                          "👎 Not helpful")
            rec = await record(api, answer_id)
            check_facts(rec, "dingtalk", history(redis_server, "dingtalk", "zhangsan")[1]["content"])
            shown = card.content

            down = await fake.press(card.out_track_id, "zhangsan", "botd_feedback_down")
            await until(lambda: down in fake.acks)
            assert (await record(api, answer_id)).votes == {"zhangsan": Vote.DOWN}
            up = await fake.press(card.out_track_id, "zhangsan", "botd_feedback_up")
            await until(lambda: up in fake.acks)
            # The 👎's push again (DingTalk re-pushes what it thinks unacknowledged): a replay, refused.
            del fake.acks[down]
            await fake.press(card.out_track_id, "zhangsan", "botd_feedback_down", mid=down)
            await until(lambda: down in fake.acks)
            # A button of a card botd never offered feedback on: ignored.
            other = await fake.press("botd-unknown-card", "zhangsan", "botd_feedback_down")
            await until(lambda: other in fake.acks)
            assert (await record(api, answer_id)).votes == {"zhangsan": Vote.UP}
            assert card.content == shown and fake.errors == []
