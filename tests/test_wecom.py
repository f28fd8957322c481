"""WeCom against the real daemon and model, a fake WeCom API on 127.0.0.1, and callbacks
encrypted by wechatpy (an independent implementation) or taken from Tencent's sample."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from urllib.parse import quote

import pytest
import yarl
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from wechatpy.enterprise.crypto import WeChatCrypto

from connectors.textsplit import split_text, utf8_len
from connectors.wecom import WeComApi, WeComCrypto, WeComCryptoError, WeComReply
from connectors.wecom.config import WecomConfig
from core.kv import KeyValueCache
from core.messages import Account
from core.redis_store import RedisManager
from tests.fakes import FakeWeCom, serve
from tests.helpers import busy_model, make_config, running_daemon, wait_for

# Tencent's WXBizMsgCrypt sample values
TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
CORP = "ww1436e0e65a779aee"
URL_SIG, URL_TS, URL_NONCE = "012bc692d0a58dd4b10f8dfe5c4ac00ae211ebeb", "1476416373", "47744683"
URL_ECHO = "fsi1xnbH4yQh0+PJxcOdhhK6TDXkjMyhEPA7xB2TGz6b+g7xyAbEkRxN/3cNXW9qdqjnoVzEtpbhnFyq6SVHyA=="
MSG_SIG, MSG_TS, MSG_NONCE = "0c3914025cb4b4d68103f6bfc8db550f79dcf48e", "1476422779", "1597212914"
MSG_ENCRYPT = (
    "Kl7kjoSf6DMD1zh7rtrHjFaDapSCkaOnwu3bqLc5tAybhhMl9pFeK8NslNPVdMwmBQTNoW4mY7AIjeLvEl3NyeTkAgGzBhzTtRLNshw2AEew+"
    "kkYcD+Fq72Kt00fT0WnN87hGrW8SqGc+NcT3mu87Ha3dz1pSDi6GaUA6A0sqfde0VJPQbZ9U+3JWcoD4Z5jaU0y9GSh010wsHF8KZD24YhmZH4ch4K"
    "a7ilEbjbfvhKkNL65HHL0J6EYJIZUC2pFrdkJ7MhmEbU2qARR4iQHE7wy24qy0cRX3Mfp6iELcDNfSsPGjUQVDGxQDCWjayJOpcwocugux082f49HKY"
    "g84EpHSGXAyh+/oxwaWbvL6aSDPOYuPDGOCI8jmnKiypE+"
)
MSG_PLAIN = (
    "<xml><ToUserName>ww1436e0e65a779aee</ToUserName><FromUserName>ChenJiaShun</FromUserName>"
    "<CreateTime>1476422779</CreateTime><MsgType>text</MsgType><Content>你好</Content>"
    "<MsgId>1456453720</MsgId><AgentID>1000002</AgentID></xml>"
)


def envelope(encrypt: str) -> bytes:
    return (f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><AgentID><![CDATA[1000002]]></AgentID>"
            f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>").encode()


def text_xml(user: str, content: str, msgid: int, kind: str = "text", created: int | None = None) -> str:
    extra = f"<Content><![CDATA[{content}]]></Content>" if kind == "text" else "<PicUrl><![CDATA[http://x/p.jpg]]></PicUrl>"
    return (f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>"
            f"<CreateTime>{created or int(time.time())}</CreateTime><MsgType><![CDATA[{kind}]]></MsgType>{extra}"
            f"<MsgId>{msgid}</MsgId><AgentID>1000002</AgentID></xml>")


def wechatpy_encrypt(plain: str, corp: str = CORP) -> str:
    """Encrypt with wechatpy (independent of botd) and return the Encrypt field."""
    import re

    out = WeChatCrypto(TOKEN, AES_KEY, corp).encrypt_message(plain, "12345", str(int(time.time())))
    return re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]></Encrypt>", out).group(1)


def sign(encrypt: str, ts: str = "1700000000", nonce: str = "n0nce") -> str:
    return WeComCrypto(TOKEN, AES_KEY, CORP).signature(ts, nonce, encrypt)


@pytest.fixture
def wecom_env(monkeypatch):
    monkeypatch.setenv("WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AES_KEY", AES_KEY)
    monkeypatch.setenv("WECOM_SECRET", "app-secret-value")


def wecom_config(tmp_path, redis_url, api_base, **extra):
    app = {"corp_id": CORP, "agent_id": 1000002, "token": "env:WECOM_TOKEN",
           "encoding_aes_key": "env:WECOM_AES_KEY", "secret": "env:WECOM_SECRET", "api_base": api_base, **extra}
    return make_config(tmp_path, redis_url, wecom={"assistant": app}, model={"max_tokens": 24})


async def post_callback(api, encrypt: str, *, signature: str | None = None, body: bytes | None = None,
                        ts: str | None = None):
    ts, nonce = ts or str(int(time.time())), "n0nce"
    sig = signature or sign(encrypt, ts, nonce)
    url = f"{api.base}/wecom/assistant?msg_signature={sig}&timestamp={ts}&nonce={nonce}"
    async with api.session.post(url, data=body if body is not None else envelope(encrypt)) as r:
        return r.status, await r.text()


# -- crypto against the official vectors -----------------------------------------------------------

def test_official_vectors_with_botd_crypto():
    c = WeComCrypto(TOKEN, AES_KEY, CORP)
    assert c.check_signature(URL_SIG, URL_TS, URL_NONCE, URL_ECHO)
    assert c.decrypt(URL_ECHO) == "1288432023552776189"
    assert c.check_signature(MSG_SIG, MSG_TS, MSG_NONCE, MSG_ENCRYPT)
    assert c.decrypt(MSG_ENCRYPT) == MSG_PLAIN
    assert not c.check_signature(MSG_SIG.replace("0", "1"), MSG_TS, MSG_NONCE, MSG_ENCRYPT)
    # botd's encryption decrypts with wechatpy, and the other way round
    mine = c.encrypt("<xml>hello 你好</xml>")
    assert WeChatCrypto(TOKEN, AES_KEY, CORP).decrypt_message(
        f"<xml><Encrypt><![CDATA[{mine}]]></Encrypt></xml>", sign(mine, "1", "2"), "1", "2") == "<xml>hello 你好</xml>"
    with pytest.raises(WeComCryptoError):
        WeComCrypto(TOKEN, AES_KEY, "another-corp").decrypt(MSG_ENCRYPT)


async def test_url_verification_official_vector_and_plus_in_echostr(tmp_path, redis_server, wecom_env):
    fake = FakeWeCom()
    async with serve(fake.app()) as base, running_daemon(wecom_config(tmp_path, redis_server.url, base)) as api:
        # Tencent's sample is correctly signed but from 2016: outside the timestamp window, refused
        # (else any captured callback could be replayed here to have it decrypted).
        qs = f"msg_signature={URL_SIG}&timestamp={URL_TS}&nonce={URL_NONCE}&echostr={quote(URL_ECHO, safe='')}"
        async with api.session.get(f"{api.base}/wecom/assistant?{qs}") as r:
            assert r.status == 403
        # WeCom sends '+' unescaped in the query string: it must still verify
        for i in range(200):
            echo = wechatpy_encrypt(f"echo-{i}")
            if "+" in echo:
                break
        assert "+" in echo
        now = str(int(time.time()))
        raw = f"msg_signature={sign(echo, now, '2')}&timestamp={now}&nonce=2&echostr={echo.replace('=', '%3D')}"
        async with api.session.get(yarl.URL(f"{api.base}/wecom/assistant?{raw}", encoded=True)) as r:
            assert r.status == 200
            assert await r.read() == f"echo-{i}".encode()  # bare plaintext: no quotes, no newline
        # wrong signature: 403
        bad = raw.replace(sign(echo, now, "2"), "0" * 40)
        async with api.session.get(yarl.URL(f"{api.base}/wecom/assistant?{bad}", encoded=True)) as r:
            assert r.status == 403
        assert fake.calls == []


async def test_official_message_gets_one_answer_to_the_sender(tmp_path, redis_server, wecom_env):
    fake = FakeWeCom()
    async with serve(fake.app()) as base, running_daemon(wecom_config(tmp_path, redis_server.url, base)) as api:
        # Tencent's sample message as captured (2016): correctly signed, too old, never answered.
        url = f"{api.base}/wecom/assistant?msg_signature={MSG_SIG}&timestamp={MSG_TS}&nonce={MSG_NONCE}"
        async with api.session.post(url, data=envelope(MSG_ENCRYPT)) as r:
            assert r.status == 403
        # The same message sent now (encrypted by wechatpy).
        encrypt = wechatpy_encrypt(MSG_PLAIN.replace("1476422779", str(int(time.time()))))
        for _ in range(3):  # WeCom's retries of the same callback
            status, text = await post_callback(api, encrypt)
            assert status == 200 and text == ""

        async def answered() -> bool:
            return len(fake.sent) >= 1

        await wait_for(answered, timeout=30)
        await asyncio.sleep(1.0)  # room for a duplicate to show up, if there were one
        assert len(fake.sent) == 1
        sent = fake.sent[0]
        assert sent["touser"] == "ChenJiaShun" and sent["agentid"] == 1000002
        assert sent["msgtype"] == "text" and sent["text"]["content"].strip()
        # the exchange is in ChenJiaShun's history with this bot
        hist = redis_server.client().lrange("botd:hist:wecom:assistant:ChenJiaShun:", 0, -1)
        assert len(hist) == 2 and "你好" in hist[0]


async def test_callback_is_answered_at_once_while_the_model_is_busy(tmp_path, redis_server, wecom_env):
    fake = FakeWeCom()
    async with serve(fake.app()) as base, running_daemon(wecom_config(tmp_path, redis_server.url, base)) as api:
        async with busy_model(api):
            t0 = time.monotonic()
            status, _ = await post_callback(api, wechatpy_encrypt(text_xml("zhangsan", "你好，请介绍一下你自己", 9001)))
            elapsed = time.monotonic() - t0
            assert status == 200
            assert elapsed < 0.5, elapsed  # WeCom allows 5 s
            print(f"callback answered in {elapsed * 1000:.1f} ms with {len(api.daemon.runtime.queue)} jobs queued")

        async def answered() -> bool:
            return any(s["touser"] == "zhangsan" for s in fake.sent)

        await wait_for(answered, timeout=60)


@pytest.mark.parametrize("case", ["tampered", "wrong_corp", "bad_base64", "bad_padding", "billion_laughs",
                                  "wrong_signature", "no_encrypt", "not_xml"])
async def test_bad_callbacks_are_refused_without_an_answer(tmp_path, redis_server, wecom_env, case):
    fake = FakeWeCom()
    good = wechatpy_encrypt(text_xml("lisi", "hello", 7001))
    body = None
    signature = None
    expected = 400
    if case == "tampered":
        raw = bytearray(base64.b64decode(good))
        raw[0] ^= 0x55  # flips the length field of the plaintext
        encrypt = base64.b64encode(bytes(raw)).decode()
    elif case == "wrong_corp":
        encrypt = wechatpy_encrypt(text_xml("lisi", "hello", 7002), corp="ww0000000000000000")
    elif case == "bad_base64":
        encrypt = "this is *not* base64!"
    elif case == "bad_padding":
        key = base64.b64decode(AES_KEY + "=")
        msg = text_xml("lisi", "hello", 7003).encode()
        plain = os.urandom(16) + struct.pack(">I", len(msg)) + msg + CORP.encode()
        pad = 32 - len(plain) % 32
        plain += bytes([pad - 1 or 33]) * pad  # inconsistent PKCS#7 bytes
        enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
        encrypt = base64.b64encode(enc.update(plain) + enc.finalize()).decode()
    elif case == "billion_laughs":
        encrypt = good
        body = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
                b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
                b"<xml><Encrypt>&lol3;</Encrypt></xml>")
    elif case == "wrong_signature":
        encrypt = "this is *not* base64!"  # would be a 400 if decryption were tried first
        signature = "f" * 40
        expected = 403
    elif case == "no_encrypt":
        encrypt = good
        body = b"<xml><ToUserName>x</ToUserName></xml>"
    else:
        encrypt = good
        body = b"this is not xml at all"
    async with serve(fake.app()) as base, running_daemon(wecom_config(tmp_path, redis_server.url, base)) as api:
        status, text = await post_callback(api, encrypt, signature=signature, body=body)
        assert status == expected, text
        await asyncio.sleep(0.3)
        assert fake.calls == []
        assert redis_server.client().keys("botd:hist:*") == []
        status, _ = await api.get("/healthz")
        assert status == 200


async def test_access_token_cached_and_refreshed_once(tmp_path, redis_server, wecom_env):
    fake = FakeWeCom()
    async with serve(fake.app()) as base, running_daemon(wecom_config(tmp_path, redis_server.url, base)) as api:
        for i in range(3):
            status, _ = await post_callback(api, wechatpy_encrypt(text_xml(f"user{i}", "hi", 100 + i)))
            assert status == 200

        async def delivered(n: int):
            async def check() -> bool:
                return len(fake.sent) >= n
            return check

        await wait_for(await delivered(3), timeout=60)
        assert fake.tokens_issued == 1
        # the token is shared through Redis, with an expiry before WeCom's 7200 s
        ttl = redis_server.client().ttl(f"botd:cache:wecom:token:{CORP}:1000002")
        assert 6000 < ttl <= 6900
        fake.expire_next_sends = 1
        status, _ = await post_callback(api, wechatpy_encrypt(text_xml("user9", "hi again", 200)))
        await wait_for(await delivered(4), timeout=60)
        assert fake.tokens_issued == 2
        assert fake.sent[-1]["touser"] == "user9"
        assert [c[0] for c in fake.calls].count("gettoken") == 2


async def test_non_text_events_commands_and_allow_lists(tmp_path, redis_server, wecom_env):
    fake = FakeWeCom()
    fake.departments = {"carol": [7, 9], "dave": [3]}
    cfg_extra = {"allow_users": ["alice"], "allow_departments": [7]}
    async with serve(fake.app()) as base, \
            running_daemon(wecom_config(tmp_path, redis_server.url, base, **cfg_extra)) as api:
        await post_callback(api, wechatpy_encrypt(text_xml("alice", "", 1, kind="image")))
        event = (f"<xml><ToUserName>{CORP}</ToUserName><FromUserName>alice</FromUserName><CreateTime>1</CreateTime>"
                 "<MsgType>event</MsgType><Event>enter_agent</Event><AgentID>1000002</AgentID></xml>")
        await post_callback(api, wechatpy_encrypt(event))
        await post_callback(api, wechatpy_encrypt(text_xml("alice", "/help", 2)))
        await post_callback(api, wechatpy_encrypt(text_xml("dave", "hello", 3)))
        await post_callback(api, wechatpy_encrypt(text_xml("carol", "/reset", 4)))

        async def four() -> bool:
            return len(fake.sent) >= 4

        await wait_for(four, timeout=30)
        await asyncio.sleep(0.5)
        by_user = {}
        for s in fake.sent:
            by_user.setdefault(s["touser"], []).append(s["text"]["content"])
        assert len(by_user["alice"]) == 2  # the image and /help; the event got nothing
        assert any("text" in m for m in by_user["alice"])
        assert any("/reset" in m for m in by_user["alice"])
        assert by_user["dave"] == [by_user["dave"][0]] and "not allowed" in by_user["dave"][0]
        assert "forget" in by_user["carol"][0].lower()


def test_split_5000_bytes_of_chinese():
    text = ("企业微信是腾讯微信团队打造的企业通讯与办公工具。" * 30 + "\n\n") * 3
    assert utf8_len(text) > 5000
    parts = split_text(text, 2048, utf8_len)
    assert len(parts) >= 3
    assert all(utf8_len(p) <= 2048 for p in parts)
    assert "".join(parts) == text  # no character cut or lost
    assert all(p.endswith(("。", "\n")) for p in parts[:-1])  # on sentence or paragraph ends


async def test_long_chinese_answer_is_delivered_in_parts(tmp_path, redis_server):
    fake = FakeWeCom()
    manager = RedisManager(make_config(tmp_path, redis_server.url).redis, tmp_path)
    await manager.start()
    import aiohttp

    text = "这是一个很长的回答，用来测试分段发送。" * 90
    assert utf8_len(text) > 5000
    try:
        async with serve(fake.app()) as base, aiohttp.ClientSession() as session:
            cfg = WecomConfig(corp_id=CORP, agent_id=1000002, token="env:X", encoding_aes_key="env:Y",
                              secret="env:Z", api_base=base)
            cache = KeyValueCache(manager, "botd")
            api = WeComApi(cfg, "app-secret-value", cache, session, backoff_s=0.01)
            fake.fail_next_sends = [-1]  # one "system busy": retried with backoff
            # The reply target alone against the fake WeCom API: no model, no daemon.
            await WeComReply(Account("wecom", "assistant"), api, cache, "wangwu").show(text)
    finally:
        await manager.close()
    parts = [s["text"]["content"] for s in fake.sent]
    assert len(parts) == 3
    assert all(utf8_len(p) <= 2048 for p in parts)
    assert "".join(parts) == text
    assert all(s["enable_duplicate_check"] == 1 for s in fake.sent)


@pytest.mark.parametrize("stale", ["url_timestamp", "create_time"])
async def test_a_correctly_signed_callback_two_hours_old_is_refused(tmp_path, redis_server, wecom_env, stale):
    """A captured callback replayed two hours later (after the dedupe key could have expired):
    signed by wechatpy exactly as WeCom signs it, refused before any work, never answered."""
    import re

    fake = FakeWeCom()
    old = int(time.time()) - 7200
    # Replayed as captured (its URL timestamp and CreateTime both two hours old), or under a
    # fresh URL timestamp with the message's own CreateTime still two hours old.
    url_ts = str(old) if stale == "url_timestamp" else str(int(time.time()))
    out = WeChatCrypto(TOKEN, AES_KEY, CORP).encrypt_message(text_xml("lisi", "hello", 8101, created=old), "n0nce",
                                                            url_ts)
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]></Encrypt>", out).group(1)
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]></MsgSignature>", out).group(1)
    async with serve(fake.app()) as base, running_daemon(wecom_config(tmp_path, redis_server.url, base)) as api:
        status, _ = await post_callback(api, encrypt, signature=signature, ts=url_ts)
        assert status == 403
        await asyncio.sleep(0.5)
        assert fake.calls == [] and fake.sent == []
        assert redis_server.client().keys("botd:hist:*") == []
        assert redis_server.client().hlen("botd:inbox") == 0
        # The same message signed now is answered: the window is what refused it.
        status, _ = await post_callback(api, wechatpy_encrypt(text_xml("lisi", "hello", 8102)))
        assert status == 200


async def test_markdown_links_cannot_carry_markup_out(tmp_path, redis_server):
    """reply_format = "markdown": a link in the model's (or a tool's) output whose URL or label
    holds '<', '>' or '|' reaches WeCom with them encoded (no <@user> mention, no <font> tag)."""
    import aiohttp

    fake = FakeWeCom()
    manager = RedisManager(make_config(tmp_path, redis_server.url).redis, tmp_path)
    await manager.start()
    try:
        async with serve(fake.app()) as base, aiohttp.ClientSession() as session:
            cfg = WecomConfig(corp_id=CORP, agent_id=1000002, token="env:X", encoding_aes_key="env:Y",
                              secret="env:Z", api_base=base, reply_format="markdown")
            cache = KeyValueCache(manager, "botd")
            api = WeComApi(cfg, "app-secret-value", cache, session)
            await WeComReply(Account("wecom", "assistant"), api, cache, "wangwu").show(
                "See [d<@zhangsan>](https://x.io><@all>) and [ok](https://y.io/p?a=1&b=2).")
    finally:
        await manager.close()
    (sent,) = [s["markdown"]["content"] for s in fake.sent]
    assert "<" not in sent and ">" not in sent, sent
    assert "(https://x.io%3E%3C@all%3E)" in sent and "[ok](https://y.io/p?a=1&b=2)" in sent
