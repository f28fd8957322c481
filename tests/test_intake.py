"""Attachment intake, platform by platform: each connector alone (no daemon, no model) against its
fake platform with the real SDK over real HTTP. A file, a picture and a voice message arrive as the
right :class:`Attachment` and download as the very bytes the platform holds; a download past the
limit is refused while it is read (the fake counts what it actually sent); a forged or unsigned
event is refused before anything is downloaded."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from connectors.reply import AttachmentTooLarge, AttachmentUnavailable
from core.kv import KeyValueCache
from core.messages import Attachment
from tests.fakes import FakeSlack, FakeTelegram, FakeWeCom, serve
from tests.helpers import Recorder, connector_alone, make_config, wait_for

PDF = b"%PDF-1.4\n" + os.urandom(3000) + b"\n%%EOF\n"
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(2000)
OGG = b"OggS" + os.urandom(1500)
BIG = os.urandom(3 * 1024 * 1024)  # 3 MiB, refused under a 1 MiB limit
LIMIT = 1024 * 1024


async def until_got(rec: Recorder, n: int) -> None:
    async def check() -> bool:
        return len(rec.got) >= n
    await wait_for(check, timeout=30)  # generous: a loaded 2-core box


@contextlib.asynccontextmanager
async def alone(connector: type, cfg: Any, manager: Any) -> AsyncIterator[tuple[Any, Recorder]]:
    """The connector alone against its fake platform (webhooks on ``conn.url``); what it hands on is
    recorded in ``rec.got``."""
    rec = Recorder()
    async with connector_alone(connector, cfg, KeyValueCache(manager, "botd"), rec) as conn:
        yield conn, rec


async def until_connected(fake: Any) -> None:
    """The connector holds its long connection to the fake (a count of connections, or a bool)."""
    async def up() -> bool:
        return fake.connected() == 1
    await wait_for(up, timeout=30)


async def assert_refused_while_reading(target: Any, att: Attachment, shelf: Any) -> None:
    """Over the limit: AttachmentTooLarge, and the platform did not get to send the whole file."""
    before = len(shelf.sent)
    with pytest.raises(AttachmentTooLarge):
        await target.download(att, LIMIT)
    assert len(shelf.sent) == before + 1  # it was being read, not refused from an announced size
    assert shelf.sent[-1] < len(BIG)


# -- Telegram -----------------------------------------------------------------------------------------------

TG_TOKEN = "123456:TEST-token"
TG_SECRET = "wh-secret_123"
_ids = iter(range(5000, 100000))


@pytest.fixture
def tg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_TOKEN", TG_TOKEN)
    monkeypatch.setenv("TG_SECRET", TG_SECRET)


def tg_message(**content: Any) -> dict[str, Any]:
    uid = next(_ids)
    return {"update_id": uid, "message": {"message_id": uid, "date": int(time.time()), "from": {
        "id": 4242, "is_bot": False, "first_name": "Ada"}, "chat": {"id": 4242, "type": "private"}, **content}}


async def tg_post(conn: Any, update: dict[str, Any], secret: str = TG_SECRET) -> int:
    async with aiohttp.ClientSession() as s, s.post(
            f"{conn.url}/telegram/assistant", json=update,
            headers={"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}) as r:
        return r.status


def tg_cfg(tmp_path: Any, redis_url: str, base: str) -> Any:
    return make_config(tmp_path, redis_url, telegram={"assistant": {
        "token": "env:TG_TOKEN", "mode": "webhook", "webhook_secret": "env:TG_SECRET", "api_base": base + "/bot"}})


async def test_telegram_document_photo_and_voice_arrive_and_download(tmp_path, redis_server, manager, tg_env):
    from connectors.telegram.connector import TelegramConnector

    fake = FakeTelegram()
    fake.files.put("doc1", PDF)
    fake.files.put("ph-small", JPEG[:100])
    fake.files.put("ph-big", JPEG)
    fake.files.put("voice1", OGG)
    async with serve(fake.app()) as base:
        async with alone(TelegramConnector, tg_cfg(tmp_path, redis_server.url, base), manager) as (conn, rec):
            updates = [
                tg_message(document={"file_id": "doc1", "file_unique_id": "d", "file_name": "report.pdf",
                                     "mime_type": "application/pdf", "file_size": len(PDF)},
                           caption="What does it say about costs?"),
                tg_message(photo=[{"file_id": "ph-small", "file_unique_id": "s", "width": 90, "height": 90,
                                   "file_size": 100},
                                  {"file_id": "ph-big", "file_unique_id": "b", "width": 800, "height": 600,
                                   "file_size": len(JPEG)}]),
                tg_message(voice={"file_id": "voice1", "file_unique_id": "v", "duration": 3,
                                  "mime_type": "audio/ogg", "file_size": len(OGG)}),
                tg_message(sticker={"file_id": "st", "file_unique_id": "st", "width": 1, "height": 1,
                                    "is_animated": False, "is_video": False, "type": "regular"}),
            ]
            for u in updates:
                assert await tg_post(conn, u) == 200
            await until_got(rec, 4)
            (doc, t1), (photo, t2), (voice, t3), (sticker, _) = rec.got
            assert doc.text == "What does it say about costs?" and doc.readable
            assert doc.attachments == [Attachment("file", name="report.pdf", mime="application/pdf", size=len(PDF),
                                                  ref={"file_id": "doc1"})]
            assert photo.text == "" and photo.readable
            assert photo.attachments == [Attachment("image", mime="image/jpeg", size=len(JPEG),
                                                    ref={"file_id": "ph-big"})]
            assert voice.attachments == [Attachment("voice", mime="audio/ogg", size=len(OGG),
                                                    ref={"file_id": "voice1"}, duration_s=3.0)]
            assert not sticker.readable and sticker.attachments == []
            assert await t1.download(doc.attachments[0], LIMIT) == PDF
            assert await t2.download(photo.attachments[0], LIMIT) == JPEG
            assert await t3.download(voice.attachments[0], LIMIT) == OGG
            assert fake.file_tokens == [TG_TOKEN] * 3
            # A restarted daemon rebuilds the target from the durable record and downloads again.
            again = conn.target(doc)
            assert await again.download(Attachment.from_dict(doc.attachments[0].as_dict()), LIMIT) == PDF


async def test_telegram_over_the_limit_and_forged_updates(tmp_path, redis_server, manager, tg_env):
    from connectors.telegram.connector import TelegramConnector

    fake = FakeTelegram()
    fake.files.put("big", BIG)
    async with serve(fake.app()) as base:
        async with alone(TelegramConnector, tg_cfg(tmp_path, redis_server.url, base), manager) as (conn, rec):
            doc = {"file_id": "big", "file_unique_id": "b", "file_name": "huge.pdf", "mime_type": "application/pdf"}
            # Forged: no secret, a wrong one. Refused, and nothing was fetched.
            assert await tg_post(conn, tg_message(document=doc), secret="") == 401
            assert await tg_post(conn, tg_message(document=doc), secret="guess") == 401
            assert rec.got == [] and fake.of("getFile") == [] and fake.files.sent == []
            assert await tg_post(conn, tg_message(document=doc)) == 200
            await until_got(rec, 1)
            msg, target = rec.got[0]
            # getFile says 3 MiB: refused before the file is requested.
            with pytest.raises(AttachmentTooLarge):
                await target.download(msg.attachments[0], LIMIT)
            assert fake.files.sent == []
            # A Bot API that does not say the size (a proxy): refused while reading.
            fake.fail_next["getFile"] = [{"ok": True, "result": {"file_id": "big", "file_unique_id": "b",
                                                                 "file_path": "documents/big"}}]
            await assert_refused_while_reading(target, msg.attachments[0], fake.files)
            with pytest.raises(AttachmentUnavailable) as gone:
                await target.download(Attachment("file", ref={"file_id": "nope"}), LIMIT)
            assert TG_TOKEN not in str(gone.value) and "TEST-token" not in str(gone.value)


# -- Slack ----------------------------------------------------------------------------------------------------

SLACK_SIGNING = "test-signing-secret-0123456789"


@pytest.fixture
def slack_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SLACK_SIGNING)


def slack_file(fake: Any, fid: str, name: str, mime: str, data: bytes, **more: Any) -> dict[str, Any]:
    fake.files.put(fid, data)
    return {"id": fid, "name": name, "title": name, "mimetype": mime, "size": len(data), "mode": "hosted",
            "url_private": fake.file_url(fid, name), "url_private_download": fake.file_url(fid, name), **more}


def slack_share(files: list[dict[str, Any]], text: str = "", channel: str = "D1") -> dict[str, Any]:
    n = next(_ids)
    return {"token": "x", "team_id": "T1", "api_app_id": "A1", "type": "event_callback", "event_id": f"Ev{n}",
            "event_time": int(time.time()), "event": {
                "type": "message", "subtype": "file_share", "channel_type": "im", "user": "U123", "text": text,
                "ts": f"{1700000000 + n}.000100", "channel": channel, "files": files}}


async def slack_post(conn: Any, payload: dict[str, Any], secret: str | None = SLACK_SIGNING) -> int:
    from slack_sdk.signature import SignatureVerifier

    body = json.dumps(payload)
    stamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp}
    if secret is not None:
        headers["X-Slack-Signature"] = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    async with aiohttp.ClientSession() as s, s.post(f"{conn.url}/slack/events", data=body.encode(),
                                                    headers=headers) as r:
        return r.status


def slack_cfg(tmp_path: Any, redis_url: str, base: str) -> Any:
    return make_config(tmp_path, redis_url, slack={"assistant": {
        "bot_token": "env:SLACK_BOT_TOKEN", "mode": "http", "api_base": base + "/api/",
        "signing_secret": "env:SLACK_SIGNING_SECRET"}})


async def test_slack_file_shares_arrive_and_download_with_the_bot_token(tmp_path, redis_server, manager, slack_env):
    from connectors.slack.connector import SlackConnector

    fake = FakeSlack()
    async with serve(fake.app()) as base:
        fake.base = base
        async with alone(SlackConnector, slack_cfg(tmp_path, redis_server.url, base), manager) as (conn, rec):
            pdf = slack_file(fake, "F1", "report.pdf", "application/pdf", PDF)
            png = slack_file(fake, "F2", "screen.png", "image/png", JPEG)
            clip = slack_file(fake, "F3", "audio_message.webm", "audio/webm", OGG, subtype="slack_audio")
            gdrive = {"id": "F4", "name": "sheet", "mimetype": "application/vnd.google-apps.spreadsheet",
                      "mode": "external", "url_private": "https://docs.google.com/x"}
            assert await slack_post(conn, slack_share([pdf, png, gdrive], "what is in these?")) == 200
            assert await slack_post(conn, slack_share([clip])) == 200
            await until_got(rec, 2)
            (files, t1), (voice, t2) = rec.got
            assert files.text == "what is in these?"
            assert [(a.kind, a.name, a.mime, a.size) for a in files.attachments] == [
                ("file", "report.pdf", "application/pdf", len(PDF)), ("image", "screen.png", "image/png", len(JPEG))]
            assert voice.text == "" and [(a.kind, a.mime) for a in voice.attachments] == [("voice", "audio/webm")]
            assert await t1.download(files.attachments[0], LIMIT) == PDF
            assert await t1.download(files.attachments[1], LIMIT) == JPEG
            assert await t2.download(voice.attachments[0], LIMIT) == OGG
            assert fake.file_auth == ["Bearer xoxb-test-token"] * 3


async def test_slack_limits_foreign_urls_and_forged_events(tmp_path, redis_server, manager, slack_env):
    from connectors.slack.connector import SlackConnector

    fake = FakeSlack()
    async with serve(fake.app()) as base, serve(FakeSlack().app()) as elsewhere:
        fake.base = base
        async with alone(SlackConnector, slack_cfg(tmp_path, redis_server.url, base), manager) as (conn, rec):
            big = slack_file(fake, "F9", "huge.pdf", "application/pdf", BIG)
            assert await slack_post(conn, slack_share([big]), secret=None) == 401
            assert await slack_post(conn, slack_share([big]), secret="forged-secret") == 401
            assert rec.got == [] and fake.file_auth == []
            assert await slack_post(conn, slack_share([big])) == 200
            await until_got(rec, 1)
            msg, target = rec.got[0]
            with pytest.raises(AttachmentTooLarge):  # announced 3 MiB: not even requested
                await target.download(msg.attachments[0], LIMIT)
            assert fake.file_auth == []
            unsized = Attachment("file", name="huge.pdf", mime="application/pdf", ref=msg.attachments[0].ref)
            await assert_refused_while_reading(target, unsized, fake.files)
            # A URL on another host never gets the token.
            foreign = Attachment("file", ref={"url": f"{elsewhere}/files-pri/T1-F9/download/huge.pdf"})
            with pytest.raises(AttachmentUnavailable, match="not on Slack's file host"):
                await target.download(foreign, LIMIT)
            # A token that may not read files: Slack's sign-in page is not taken for the file.
            fake.bot_token = "xoxb-other"
            with pytest.raises(AttachmentUnavailable, match="files:read"):
                await target.download(Attachment("file", mime="application/pdf", ref=msg.attachments[0].ref), LIMIT)


def test_slack_file_urls_that_may_carry_the_token():
    from connectors.slack.connector import file_url_allowed

    api = "https://slack.com/api/"
    assert file_url_allowed("https://files.slack.com/files-pri/T1-F1/download/a.pdf", api)
    assert not file_url_allowed("http://files.slack.com/files-pri/T1-F1/a.pdf", api)  # not over plain HTTP
    assert not file_url_allowed("https://files.slack.com.evil.example/a.pdf", api)
    assert not file_url_allowed("https://evil.example/?files.slack.com", api)
    assert not file_url_allowed("https://files.slack.com:8443/a.pdf", api)
    assert not file_url_allowed("https://files.slack.com@evil.example/a.pdf", api)  # userinfo, not the host
    assert file_url_allowed("http://127.0.0.1:9/files-pri/x", "http://127.0.0.1:9/api/")
    assert not file_url_allowed("http://127.0.0.1:10/files-pri/x", "http://127.0.0.1:9/api/")


# -- WeCom self-built app ---------------------------------------------------------------------------------------


def wecom_media_xml(user: str, kind: str, media_id: str, msgid: int, extra: str = "") -> str:
    from tests.test_wecom import CORP

    return (f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[{kind}]]></MsgType>"
            f"<MediaId><![CDATA[{media_id}]]></MediaId>{extra}<MsgId>{msgid}</MsgId><AgentID>1000002</AgentID></xml>")


async def wecom_post(conn: Any, encrypt: str, signature: str | None = None) -> int:
    from tests.test_wecom import envelope, sign

    ts, nonce = str(int(time.time())), "n0nce"
    sig = signature or sign(encrypt, ts, nonce)
    url = f"{conn.url}/wecom/assistant?msg_signature={sig}&timestamp={ts}&nonce={nonce}"
    async with aiohttp.ClientSession() as s, s.post(url, data=envelope(encrypt)) as r:
        return r.status


@pytest.fixture
def wecom_cfg(tmp_path, redis_server, monkeypatch):
    from tests.test_wecom import AES_KEY, TOKEN, wecom_config

    monkeypatch.setenv("WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AES_KEY", AES_KEY)
    monkeypatch.setenv("WECOM_SECRET", "app-secret-value")
    return lambda base: wecom_config(tmp_path, redis_server.url, base)


async def test_wecom_app_picture_voice_and_file_arrive_and_download(manager, wecom_cfg):
    from connectors.wecom.connector import WeComConnector
    from tests.test_wecom import wechatpy_encrypt

    fake = FakeWeCom()
    fake.files.put("MEDIA-IMG", JPEG)
    fake.files.put("MEDIA-AMR", OGG)
    fake.files.put("MEDIA-PDF", PDF)
    async with serve(fake.app()) as base:
        async with alone(WeComConnector, wecom_cfg(base), manager) as (conn, rec):
            for xml in (wecom_media_xml("alice", "image", "MEDIA-IMG", 11, "<PicUrl>http://x/p.jpg</PicUrl>"),
                        wecom_media_xml("alice", "voice", "MEDIA-AMR", 12, "<Format>amr</Format>"),
                        wecom_media_xml("alice", "file", "MEDIA-PDF", 13, "<FileName>合同.pdf</FileName>"),
                        wecom_media_xml("alice", "video", "MEDIA-MP4", 14)):
                assert await wecom_post(conn, wechatpy_encrypt(xml)) == 200
            await until_got(rec, 4)
            (img, t1), (voice, t2), (doc, t3), (video, _) = rec.got
            assert img.attachments == [Attachment("image", mime="image/jpeg", ref={"media_id": "MEDIA-IMG"})]
            assert voice.attachments == [Attachment("voice", mime="audio/amr", ref={"media_id": "MEDIA-AMR"})]
            assert doc.attachments == [Attachment("file", name="合同.pdf", mime="application/pdf",
                                                  ref={"media_id": "MEDIA-PDF"})]
            assert all(m.readable and m.text == "" for m in (img, voice, doc))
            assert not video.readable and video.attachments == []
            assert await t1.download(img.attachments[0], LIMIT) == JPEG
            assert await t2.download(voice.attachments[0], LIMIT) == OGG
            fake.expire_next_sends = 1  # the token expires between two downloads: fetched again once
            assert await t3.download(doc.attachments[0], LIMIT) == PDF
            assert fake.tokens_issued == 2
            with pytest.raises(AttachmentUnavailable, match="40007") as gone:  # expired media (3 days)
                await t1.download(Attachment("image", ref={"media_id": "GONE"}), LIMIT)
            assert "TOKEN" not in str(gone.value)


async def test_wecom_app_over_the_limit_and_forged_callbacks(manager, wecom_cfg):
    from connectors.wecom.connector import WeComConnector
    from tests.test_wecom import wechatpy_encrypt

    fake = FakeWeCom()
    fake.files.put("MEDIA-BIG", BIG)
    async with serve(fake.app()) as base:
        async with alone(WeComConnector, wecom_cfg(base), manager) as (conn, rec):
            encrypt = wechatpy_encrypt(wecom_media_xml("alice", "file", "MEDIA-BIG", 21))
            assert await wecom_post(conn, encrypt, signature="0" * 40) == 403
            assert await wecom_post(conn, "Zm9yZ2Vk" + encrypt[8:]) in (400, 403)  # tampered, re-signed
            assert rec.got == [] and fake.files.sent == []
            assert await wecom_post(conn, encrypt) == 200
            await until_got(rec, 1)
            msg, target = rec.got[0]
            await assert_refused_while_reading(target, msg.attachments[0], fake.files)


# -- WeCom AI bot -----------------------------------------------------------------------------------------------


@pytest.fixture
def aibot_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_wecom_aibot import AES_KEY, SECRET, TOKEN

    monkeypatch.setenv("WECOM_AIBOT_SECRET", SECRET)
    monkeypatch.setenv("WECOM_AIBOT_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AIBOT_AES_KEY", AES_KEY)


async def test_wecom_aibot_pictures_files_and_voice_over_the_long_connection(tmp_path, redis_server, manager,
                                                                             aibot_env):
    from connectors.wecom_aibot.connector import WecomAibotConnector
    from tests.fake_wecom_aibot import FakeAibot
    from tests.test_wecom_aibot import aibot_config, fake_server

    fake = FakeAibot()
    async with fake_server(fake):
        async with alone(WecomAibotConnector, aibot_config(tmp_path, redis_server.url, fake), manager) as (_, rec):
            await until_connected(fake)
            await fake.send_message("zhang", "", kind="image", content=fake.media(JPEG))
            await fake.send_message("zhang", "", kind="file", content=fake.media(PDF))
            await fake.send_message("zhang", "", kind="voice", content={"content": "报销流程是什么"})
            await fake.send_message("zhang", "", kind="mixed", content={"msg_item": [
                {"msgtype": "text", "text": {"content": "这个报错怎么办"}},
                {"msgtype": "image", "image": fake.media(JPEG[:500])}]})
            await until_got(rec, 4)
            (img, t1), (doc, t2), (voice, _), (mixed, t4) = rec.got
            assert [(a.kind, a.mime) for a in img.attachments] == [("image", "image/jpeg")]
            assert img.text == "" and img.readable and set(img.attachments[0].ref) == {"url", "aeskey"}
            assert doc.attachments[0].kind == "file"
            assert voice.text == "" and voice.attachments == [Attachment("voice", transcript="报销流程是什么")]
            assert mixed.text == "这个报错怎么办" and [a.kind for a in mixed.attachments] == ["image"]
            assert await t1.download(img.attachments[0], LIMIT) == JPEG
            assert await t2.download(doc.attachments[0], LIMIT) == PDF
            assert await t4.download(mixed.attachments[0], LIMIT) == JPEG[:500]
            with pytest.raises(AttachmentUnavailable, match="transcript"):
                await t1.download(voice.attachments[0], LIMIT)
            # The wrong key: refused as undecryptable, never returned as garbage.
            wrong = Attachment("file", ref={**doc.attachments[0].ref, "aeskey": fake.media(b"x")["aeskey"]})
            with pytest.raises(AttachmentUnavailable, match="decrypt"):
                await t2.download(wrong, LIMIT)
            big = await fake.send_message("zhang", "", kind="file", content=fake.media(BIG))
            assert big
            await until_got(rec, 5)
            msg, target = rec.got[4]
            await assert_refused_while_reading(target, msg.attachments[0], fake.files)


async def test_wecom_aibot_callback_files_use_the_bots_key_and_forged_ones_are_refused(tmp_path, redis_server,
                                                                                        manager, aibot_env):
    from connectors.wecom_aibot.connector import WecomAibotConnector
    from tests.fake_wecom_aibot import CallbackSender, FakeAibot
    from tests.test_wecom_aibot import AES_KEY, TOKEN, fake_server

    fake = FakeAibot()
    async with fake_server(fake):
        bot = {"mode": "callback", "token": "env:WECOM_AIBOT_TOKEN", "encoding_aes_key": "env:WECOM_AIBOT_AES_KEY"}
        cfg = make_config(tmp_path, redis_server.url, wecom_aibot={"assistant": bot})
        async with alone(WecomAibotConnector, cfg, manager) as (conn, rec), aiohttp.ClientSession() as session:
            sender = CallbackSender(fake, session, f"{conn.url}/wecom_aibot/assistant", TOKEN, AES_KEY)
            item = fake.media(PDF, aeskey=AES_KEY)
            del item["aeskey"]  # callback mode: the bot's own EncodingAESKey
            message = {**sender.message("li", "", "cb-file-1"), "msgtype": "file", "file": item}
            del message["text"]
            status, _ = await sender.post(message, msg_signature="0" * 40)
            assert status == 403 and rec.got == [] and fake.files.sent == []
            status, _ = await sender.post(message)
            assert status == 200
            await until_got(rec, 1)
            msg, target = rec.got[0]
            assert msg.attachments[0].ref == {"url": item["url"]}  # no key kept in the durable record
            assert await target.download(msg.attachments[0], LIMIT) == PDF


# -- DingTalk ---------------------------------------------------------------------------------------------------


async def test_dingtalk_pictures_files_and_voice_arrive_and_download(tmp_path, redis_server, manager, monkeypatch):
    from connectors.dingtalk.connector import DingtalkConnector
    from tests.fake_dingtalk import FakeDingtalk
    from tests.test_dingtalk import SECRET, dingtalk_config, fake_server

    monkeypatch.setenv("DINGTALK_SECRET", SECRET)
    fake = FakeDingtalk()
    fake.files.put("dc-pic", JPEG)
    fake.files.put("dc-pdf", PDF)
    fake.files.put("dc-voice", OGG)
    fake.files.put("dc-big", BIG)
    async with fake_server(fake):
        async with alone(DingtalkConnector, dingtalk_config(tmp_path, redis_server.url, fake), manager) as (_, rec):
            await until_connected(fake)
            for data in (
                fake.robot_message("u1", "", msgtype="picture", content={"downloadCode": "dc-pic"}),
                fake.robot_message("u1", "", msgtype="file", content={"downloadCode": "dc-pdf",
                                                                      "fileName": "制度.pdf"}),
                fake.robot_message("u1", "", msgtype="audio", content={"downloadCode": "dc-voice", "duration": 4200,
                                                                       "recognition": "年假有几天"}),
                fake.robot_message("u1", "", msgtype="richText", content={"richText": [
                    {"text": "看这个截图"}, {"type": "picture", "downloadCode": "dc-pic"}]}),
                fake.robot_message("u1", "", msgtype="video", content={"downloadCode": "dc-video"}),
                fake.robot_message("u1", "", msgtype="file", content={"downloadCode": "dc-big",
                                                                      "fileName": "big.pdf"})):
                await fake.push(data)
            await until_got(rec, 6)
            (pic, t1), (doc, t2), (voice, t3), (rich, _), (video, _), (big, t6) = rec.got
            assert pic.attachments == [Attachment("image", mime="image/jpeg", ref={"download_code": "dc-pic"})]
            assert doc.attachments == [Attachment("file", name="制度.pdf", mime="application/pdf",
                                                  ref={"download_code": "dc-pdf"})]
            assert voice.attachments == [Attachment("voice", ref={"download_code": "dc-voice"},
                                                    transcript="年假有几天", duration_s=4.2)]
            assert rich.text == "看这个截图" and [a.ref for a in rich.attachments] == [{"download_code": "dc-pic"}]
            assert all(m.readable and m.text == "" for m in (pic, doc, voice))
            assert not video.readable and video.attachments == []
            assert await t1.download(pic.attachments[0], LIMIT) == JPEG
            assert await t2.download(doc.attachments[0], LIMIT) == PDF
            assert await t3.download(voice.attachments[0], LIMIT) == OGG
            assert {c["robotCode"] for c in fake.file_codes} == {fake.client_id}
            await assert_refused_while_reading(t6, big.attachments[0], fake.files)
            with pytest.raises(AttachmentUnavailable, match="invalidParameter"):
                await t1.download(Attachment("image", ref={"download_code": "expired"}), LIMIT)


async def test_dingtalk_a_forged_callback_is_refused_before_any_download(tmp_path, redis_server, manager,
                                                                         monkeypatch):
    from connectors.dingtalk.callback import sign
    from connectors.dingtalk.connector import DingtalkConnector
    from tests.fake_dingtalk import FakeDingtalk
    from tests.platform_cluster import callback_config
    from tests.test_dingtalk import SECRET, fake_server, robot_app

    monkeypatch.setenv("DINGTALK_SECRET", SECRET)
    fake = FakeDingtalk()
    fake.files.put("dc-pdf", PDF)
    async with fake_server(fake):
        cfg = callback_config(tmp_path, redis_server.url, "dingtalk", robot_app(fake, mode="callback"), [42])
        async with alone(DingtalkConnector, cfg, manager) as (conn, rec), aiohttp.ClientSession() as s:
            body = json.dumps(fake.robot_message("u1", "", msgtype="file", content={
                "downloadCode": "dc-pdf", "fileName": "a.pdf"})).encode()
            stamp = str(int(time.time() * 1000))
            for headers in ({"timestamp": stamp, "sign": sign(stamp, "another-apps-secret")}, {}):
                async with s.post(f"{conn.url}/dingtalk/assistant", data=body, headers=headers) as r:
                    assert r.status == 403
            assert rec.got == [] and fake.file_codes == []
            async with s.post(f"{conn.url}/dingtalk/assistant", data=body,
                              headers={"timestamp": stamp, "sign": sign(stamp, SECRET)}) as r:
                assert r.status == 200
            msg, target = rec.got[0]
            assert await target.download(msg.attachments[0], LIMIT) == PDF


# -- Feishu -----------------------------------------------------------------------------------------------------


async def test_feishu_pictures_files_and_voice_arrive_and_download(tmp_path, redis_server, manager, monkeypatch):
    from connectors.feishu.connector import FeishuConnector
    from tests.fake_feishu import FakeFeishu
    from tests.test_feishu import SECRET, fake_server, feishu_config

    monkeypatch.setenv("FEISHU_SECRET", SECRET)
    fake = FakeFeishu()
    async with fake_server(fake):
        async with alone(FeishuConnector, feishu_config(tmp_path, redis_server.url, fake), manager) as (_, rec):
            await until_connected(fake)
            sent = [("om_img", "image", {"image_key": "img_v3_1"}, JPEG),
                    ("om_pdf", "file", {"file_key": "file_v3_1", "file_name": "报告.pdf"}, PDF),
                    ("om_voice", "audio", {"file_key": "file_v3_2", "duration": 2500}, OGG),
                    ("om_big", "file", {"file_key": "file_v3_3", "file_name": "big.pdf"}, BIG)]
            for mid, kind, content, data in sent:
                fake.files.put(f"{mid}/{next(iter(content.values()))}", data)
                await fake.push(fake.message_event("u1", "", message_id=mid, message_type=kind, content=content))
            await fake.push(fake.message_event("u1", "", message_id="om_post", message_type="post", content={
                "title": "", "content": [[{"tag": "text", "text": "这是什么错误"}, {"tag": "img",
                                                                               "image_key": "img_v3_1"}]]}))
            await fake.push(fake.message_event("u1", "", message_id="om_video", message_type="media",
                                               content={"file_key": "v", "image_key": "i"}))
            await until_got(rec, 6)
            (img, t1), (doc, t2), (voice, t3), (big, t4), (post, _), (video, _) = rec.got
            assert img.attachments == [Attachment("image", mime="image/jpeg", ref={
                "message_id": "om_img", "file_key": "img_v3_1", "type": "image"})]
            assert doc.attachments[0].name == "报告.pdf" and doc.attachments[0].kind == "file"
            assert voice.attachments == [Attachment("voice", mime="audio/opus", duration_s=2.5, ref={
                "message_id": "om_voice", "file_key": "file_v3_2", "type": "file"})]
            assert post.text == "这是什么错误" and [a.kind for a in post.attachments] == ["image"]
            assert all(m.readable and m.text == "" for m in (img, doc, voice))
            assert not video.readable and video.attachments == []
            assert await t1.download(img.attachments[0], LIMIT) == JPEG
            assert await t2.download(doc.attachments[0], LIMIT) == PDF
            fake.expire_tokens()  # refused once: a new tenant token, then the file
            assert await t3.download(voice.attachments[0], LIMIT) == OGG
            assert fake.resource_types == ["image", "file", "file"]
            await assert_refused_while_reading(t4, big.attachments[0], fake.files)
            with pytest.raises(AttachmentUnavailable, match="234003"):
                await t1.download(Attachment("image", ref={"message_id": "om_img", "file_key": "gone",
                                                           "type": "image"}), LIMIT)


async def test_feishu_a_forged_callback_is_refused_before_any_download(tmp_path, redis_server, manager,
                                                                       monkeypatch):
    from connectors.feishu.connector import FeishuConnector
    from tests.fake_feishu import FakeFeishu
    from tests.platform_cluster import callback_config
    from tests.test_feishu import KEY, SECRET, _signed, callback_app, fake_server

    monkeypatch.setenv("FEISHU_SECRET", SECRET)
    monkeypatch.setenv("FEISHU_ENCRYPT_KEY", KEY)
    monkeypatch.setenv("FEISHU_VERIFICATION_TOKEN", "vtoken")
    fake = FakeFeishu()
    fake.files.put("om_f/file_1", PDF)
    async with fake_server(fake):
        cfg = callback_config(tmp_path, redis_server.url, "feishu", callback_app(fake), ["od_42"])
        async with alone(FeishuConnector, cfg, manager) as (conn, rec), aiohttp.ClientSession() as s:
            event = fake.message_event("u1", "", message_id="om_f", message_type="file",
                                       content={"file_key": "file_1", "file_name": "a.pdf"})
            headers, body = _signed(event, key="another-apps-key")
            async with s.post(f"{conn.url}/feishu/assistant", data=body, headers=headers) as r:
                assert r.status == 403
            assert rec.got == [] and fake.resource_types == []
            headers, body = _signed(event)
            async with s.post(f"{conn.url}/feishu/assistant", data=body, headers=headers) as r:
                assert r.status == 200
            msg, target = rec.got[0]
            assert await target.download(msg.attachments[0], LIMIT) == PDF
