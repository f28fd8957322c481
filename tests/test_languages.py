"""botd's own texts in the user's language (issue 18): a bot's ``language`` is "zh", "en" or
"auto"; with "auto" a Chinese message gets Chinese texts, an English one English, and one with
no words to judge (a photo, a bare "/help") both. The first tests need nothing running; the
last ones boot the daemon (real model, real Redis, a fake Telegram)."""

from __future__ import annotations

import re
import string

import pytest
from pydantic import ValidationError

from bots import texts
from bots.delivery import Delivery
from connectors.telegram.connector import TelegramReply
from core.config import NO_DOCUMENT_TEXT, BotConfig
from core.messages import Account, Finish, InboundMessage, ReplyEvent
from tests.fakes import FakeTelegram, serve
from tests.helpers import busy_model, make_config, running_daemon, wait_for
from tests.test_startup_and_outcomes import post_update, shown_in
from tests.test_telegram import SECRET, private_update, tg_config

HAN = re.compile("[\u4e00-\u9fff]")


@pytest.fixture(autouse=True)
def tg_env(monkeypatch):
    monkeypatch.setenv("TG_TOKEN", "123456:TEST-token")
    monkeypatch.setenv("TG_SECRET", SECRET)


def fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


# -- choosing the language ----------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "text", "lang"), [
    ("auto", "年假有几天？", "zh"),
    ("auto", "How many days of leave do I have?", "en"),
    ("auto", "请问 VPN 怎么连？", "zh"),  # mixed: any Chinese character decides
    ("auto", "", "both"),  # a photo: nothing to judge
    ("auto", "/help", "both"),
    ("auto", "/reset 重新开始", "zh"),
    ("zh", "Hello", "zh"),
    ("en", "你好", "en"),
    ("zh", "", "zh"),
])
def test_the_language_follows_the_setting_or_the_message(setting, text, lang):
    assert texts.language(setting, text) == lang


def test_bot_language_defaults_to_auto_and_refuses_others():
    assert BotConfig().language == "auto"
    assert BotConfig(language="zh").language == "zh"
    with pytest.raises(ValidationError):
        BotConfig(language="fr")


# -- the texts themselves -------------------------------------------------------------------------


def test_every_text_has_a_chinese_and_an_english_form_with_the_same_fields():
    for key in texts.keys():
        zh, en, both = (texts.say(key, lang) for lang in ("zh", "en", "both"))
        if key in ("EMPTY", "KB_SOURCE_ITEM"):
            continue  # no words, or a file name and a number
        assert HAN.search(zh), key
        assert not HAN.search(en), key
        assert HAN.search(both) and re.search("[A-Za-z]", both), key
        if key != "RATE_LIMITED":  # its English is the limiter's own message
            assert fields(zh) == fields(en) == fields(both), key


def test_busy_and_failed_read_differently_in_each_language():
    zh, en = texts.say("BUSY", "zh", s=5), texts.say("BUSY", "en", s=5)
    assert "忙" in zh and "5" in zh and "busy" not in zh
    assert "busy" in en and "5" in en and "忙" not in en
    fz, fe = texts.say("FAILED", "zh"), texts.say("FAILED", "en")
    assert "出错" in fz and "忙" not in fz and "error" in fe and "busy" not in fe
    # The old names keep both languages, for callers that have no message to judge.
    assert texts.BUSY == texts.say("BUSY", "both") and "忙" in texts.BUSY and "busy" in texts.BUSY


def test_waits_read_in_the_users_language():
    assert texts.wait_text(40, "zh") == "40 秒" and texts.wait_text(40, "en") == "40 s"
    assert texts.wait_text(3 * 3600 + 5 * 60, "zh") == "3 小时 5 分钟"
    assert texts.say("RATE_LIMITED", "zh", wait="40 秒", detail="x") == "您的消息或用量已达到上限，请在 40 秒后再试。"
    assert texts.say("RATE_LIMITED", "en", wait="40 s", detail="This user has sent 3 messages") == \
        "This user has sent 3 messages"


def test_the_default_refusal_matches_the_configs_default():
    # The service shows the Chinese refusal only in place of the default English one.
    assert texts.say("NO_DOCUMENT", "en") == NO_DOCUMENT_TEXT


# -- the streaming policy chooses the text by the message -----------------------------------------


class _Expired:
    """An answer that waited its whole turn without a free model."""
    id = "r1"

    async def events(self):
        yield ReplyEvent(finish_reason=Finish.EXPIRED, retry_after=9)

    def cancel(self) -> None:
        pass


class _Failed(_Expired):
    async def events(self):
        yield ReplyEvent(finish_reason=Finish.ERROR)


@pytest.mark.parametrize(("text", "lang"), [("你好，在吗？", "zh"), ("Hello, are you there?", "en")])
async def test_delivery_says_busy_and_failed_in_the_messages_language(text, lang):
    from telegram import Bot

    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        bot = Bot("123456:TEST-token", base_url=base + "/bot")
        for answer, key, fields_ in ((_Expired(), "BUSY", {"s": 9}), (_Failed(), "FAILED", {})):
            msg = InboundMessage(platform="telegram", bot="assistant", chat="77", user="77", text=text)
            target = TelegramReply(Account("telegram", "assistant"), bot, {"chat_id": 77}, interval=0.05)
            await Delivery(msg, target).stream(answer)
            assert target.sent, key
            shown = [m["text"] for m in fake.messages.values()][-1]
            assert shown == texts.say(key, lang, **fields_), (key, shown)
        # A photo: nothing to judge, so both languages.
        photo = InboundMessage(platform="telegram", bot="assistant", chat="77", user="77", text="", readable=False)
        target = TelegramReply(Account("telegram", "assistant"), bot, {"chat_id": 77}, interval=0.05)
        await Delivery(photo, target).stream(_Expired())
        assert [m["text"] for m in fake.messages.values()][-1] == texts.say("BUSY", "both", s=9)
        # A bot set to one language says it in that one whatever the message.
        target = TelegramReply(Account("telegram", "assistant"), bot, {"chat_id": 77}, interval=0.05)
        await Delivery(photo, target, lang="en").stream(_Failed())
        assert [m["text"] for m in fake.messages.values()][-1] == texts.say("FAILED", "en")


# -- end to end: the daemon, a real model, a fake Telegram ---------------------------------------


async def test_a_chinese_message_gets_chinese_help_refusal_and_commands_over_the_api(tmp_path, redis_server):
    docs = tmp_path / "hr"
    docs.mkdir()
    (docs / "leave.md").write_text("# Annual leave\n\nEvery employee has 27 days of annual leave a year.\n")
    cfg = make_config(tmp_path, redis_server.url,
                      knowledge={"hr": {"paths": [str(docs)], "schedule": ""}},
                      bots={"hr": {"knowledge": ["hr"]}, "en_only": {"language": "en"}},
                      api={"default_bot": "hr", "anonymous_bots": ["hr"]})
    async with running_daemon(cfg) as api:
        help_zh = (await api.chat("/help 怎么用", cid="z1"))["choices"][0]["message"]["content"]
        assert help_zh == texts.say("HELP", "zh", bot="hr")
        help_both = (await api.chat("/help", cid="z2"))["choices"][0]["message"]["content"]
        assert "命令" in help_both and "Commands" in help_both
        reset_zh = (await api.chat("/reset 重新开始", cid="z1"))["choices"][0]["message"]["content"]
        assert reset_zh == texts.say("RESET_NOTHING", "zh")
        # No document on it: the default refusal, in Chinese for a Chinese question.
        refusal = (await api.chat("公司食堂今天中午有什么菜？", cid="z3",
                                  max_tokens=8))["choices"][0]["message"]["content"]
        assert refusal == texts.say("NO_DOCUMENT", "zh")
        refusal_en = (await api.chat("What is for lunch in the canteen today?", cid="e3",
                                     max_tokens=8))["choices"][0]["message"]["content"]
        assert refusal_en == NO_DOCUMENT_TEXT
        # A bot set to English answers a Chinese command in English.
        status, data, _ = await api.post("/v1/chat/completions", {
            "model": "en_only", "conversation_id": "e4", "messages": [{"role": "user", "content": "/help 怎么用"}]})
        assert status == 200, data
        assert data["choices"][0]["message"]["content"] == texts.say("HELP", "en", bot="en_only")


async def test_a_chinese_telegram_message_is_told_busy_in_chinese(tmp_path, redis_server):
    fake = FakeTelegram()
    async with serve(fake.app()) as base:
        cfg = tg_config(tmp_path, redis_server.url, base)
        cfg = cfg.model_copy(update={"queue": cfg.queue.model_copy(update={"max_wait_s": 0.5})})
        async with running_daemon(cfg) as api, busy_model(api, jobs=3):
            assert await post_update(api.session, api.daemon.port, private_update("你好，在吗？", chat_id=7101)) == 200
            assert await post_update(api.session, api.daemon.port, private_update("Hello?", chat_id=7102)) == 200
            busy_zh = texts.say("BUSY", "zh", s=cfg.queue.retry_after_s)
            busy_en = texts.say("BUSY", "en", s=cfg.queue.retry_after_s)

            async def told() -> bool:
                return shown_in(fake, 7101) == [busy_zh] and shown_in(fake, 7102) == [busy_en]

            await wait_for(told, timeout=60)
