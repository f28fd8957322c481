"""Files sent through each platform, end to end: the real daemon (real model, embedder, parsers,
Redis) behind the real platform library, only the platform itself faked (tests/fakes.py).

The same scenario runs on every platform (:func:`answered_from_files`): a PDF without a
question is acknowledged with its page count; the next question of that thread is answered from
it, the file cited by name; a Word file sent with its question is read and cited at once; another
member of the same group (or another conversation of the same user) asks the same question and
gets neither file. Each platform's test supplies only ``ask``: how a user sends a message (with a
file) there and what the platform then shows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from core.messages import ThreadKey
from tests.fakes import FakeSlack, FakeTelegram, FakeWeCom, serve
from tests.helpers import make_config, running_daemon, wait_for
from tests.test_files_in_chat import BUDGET_Q, FLIGHT_Q, make_docx, make_pdf

File = tuple[str, str, bytes]  # name, MIME type, content
# ask(who, text, file) -> what the platform shows as the answer; ``who`` is "a" or "b": two
# members of one group chat (or two conversations), each with a thread of their own.
Ask = Callable[[str, str, "File | None"], Awaitable[str]]

PDF = ("report.pdf", "application/pdf", make_pdf())
DOCX = ("travel.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", make_docx())


async def answered_from_files(ask: Ask) -> None:
    shown = await ask("a", "", PDF)
    assert "Got report.pdf (2 pages), ask away." in shown, shown
    shown = await ask("a", BUDGET_Q, None)
    assert "Sources:" in shown and "report.pdf" in shown.split("Sources:")[-1], shown
    shown = await ask("a", FLIGHT_Q, DOCX)
    assert "travel.docx" in shown.split("Sources:")[-1], shown
    # The other member (thread) of the same group: neither file.
    shown = await ask("b", BUDGET_Q, None)
    assert "report.pdf" not in shown and "travel.docx" not in shown, shown


def files_config(tmp_path: Any, redis_url: str, **sections: Any) -> Any:
    bots = {"assistant": {"language": "en"}, **sections.pop("bots", {})}
    return make_config(tmp_path, redis_url, model={"max_tokens": 4}, files={"per_user_per_day": 0}, bots=bots,
                       **sections)


async def stored_turns(redis_server: Any, thread: ThreadKey) -> int:
    return int(redis_server.client().llen("botd:hist:" + thread.redis_suffix()))


async def settled(read: Callable[[], str], done: Callable[[str], bool], timeout: float = 90) -> str:
    """What ``read`` shows once ``done`` holds for it and it stopped changing (the last edit)."""
    async def check() -> bool:
        return done(read())
    await wait_for(check, timeout=timeout, interval=0.1)
    last = read()
    while True:
        await asyncio.sleep(0.7)
        now = read()
        if now == last:
            return now
        last = now


def complete(before: int, history: Callable[[], int]) -> Callable[[str], bool]:
    """An answer is complete when its exchange is stored (two more turns), or when it is a
    file's acknowledgement (a fixed text, not stored)."""
    return lambda shown: history() >= before + 2 or "ask away" in shown


# -- the web console --------------------------------------------------------------------------------------------


async def test_files_sent_in_the_console_chat_are_answered_in_their_conversation_only(tmp_path, redis_server,
                                                                                        monkeypatch):
    from tests.test_console import KEY, USERS, browsers

    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", KEY)
    cfg = files_config(tmp_path, redis_server.url, bots={"hr": {"language": "en"}},
                       console={"enabled": True, "signing_key": "env:BOTD_TEST_CONSOLE_KEY",
                                "users": {"alice": USERS["alice"]}})
    async with running_daemon(cfg) as api, browsers(api, "alice") as (alice,):
        async def ask(who: str, text: str, file: File | None) -> str:
            fields = {"bot": "hr", "text": text, "conversation": f"conv-{who}"}
            send: dict[str, Any] = {"json": fields}  # as the page sends it: a form only with files
            if file is not None:
                form = aiohttp.FormData()
                for k, v in fields.items():
                    form.add_field(k, v)
                form.add_field("file", file[2], filename=file[0], content_type=file[1])
                send = {"data": form}
            async with alice.http.post(alice.base + "/api/chat", headers={"X-CSRF-Token": alice.csrf}, **send) as r:
                assert r.status == 200, await r.text()
                events = [json.loads(line) for line in (await r.text()).splitlines() if line.strip()]
            final = events[-1]
            assert final["done"], events
            text_shown = "".join(e.get("delta", "") for e in events)
            return text_shown + ("\n\nSources: " + "; ".join(final["sources"]) if final["sources"] else "")

        await answered_from_files(ask)
        # Someone else's upload key is not readable from this user's answers.
        uploads = api.daemon.connectors["web_console"].uploads
        att = await uploads.keep("bob", "x.md", "text/markdown", b"# secret")
        from connectors.reply import AttachmentUnavailable

        with pytest.raises(AttachmentUnavailable):
            await uploads.download_for("alice")(att, 1000)
        assert await uploads.download_for("bob")(att, 1000) == b"# secret"


# -- Telegram (a group, one history per member) --------------------------------------------------------------


async def test_files_sent_through_telegram_are_answered_in_the_senders_thread_only(tmp_path, redis_server,
                                                                                     monkeypatch):
    from tests.test_intake import TG_SECRET, TG_TOKEN, tg_post

    monkeypatch.setenv("TG_TOKEN", TG_TOKEN)
    monkeypatch.setenv("TG_SECRET", TG_SECRET)
    fake = FakeTelegram()
    users = {"a": {"id": 4242, "is_bot": False, "first_name": "Ada"},
             "b": {"id": 5151, "is_bot": False, "first_name": "Bo"}}
    chat = {"id": -100777, "type": "supergroup", "title": "Team"}
    ids = iter(range(7000, 8000))
    async with serve(fake.app()) as base:
        cfg = files_config(tmp_path, redis_server.url, telegram={"assistant": {
            "token": "env:TG_TOKEN", "mode": "webhook", "webhook_secret": "env:TG_SECRET", "api_base": base + "/bot",
            "group_history": "member", "edit_interval_group_s": 0.5}})
        async with running_daemon(cfg) as api:
            api.url = api.base

            def shown(message_id: int) -> str:
                sends = fake.of("sendMessage")
                for i, params in enumerate(sends):
                    if json.loads(params.get("reply_parameters") or "{}").get("message_id") == message_id:
                        return str(fake.messages[i + 1]["text"])
                return ""

            async def ask(who: str, text: str, file: File | None) -> str:
                uid = next(ids)
                said = f"@botd_test_bot {text}".strip()
                mention = [{"type": "mention", "offset": 0, "length": len("@botd_test_bot")}]
                msg: dict[str, Any] = {"message_id": uid, "date": int(time.time()), "from": users[who], "chat": chat}
                if file is None:
                    msg |= {"text": said, "entities": mention}
                else:
                    fake.files.put(f"f{uid}", file[2])
                    msg |= {"caption": said, "caption_entities": mention, "document": {
                        "file_id": f"f{uid}", "file_unique_id": f"u{uid}", "file_name": file[0], "mime_type": file[1],
                        "file_size": len(file[2])}}
                thread = ThreadKey("telegram", "assistant", str(chat["id"]), f"/{users[who]['id']}")
                before = await stored_turns(redis_server, thread)
                assert await tg_post(api, {"update_id": uid, "message": msg}) == 200
                history = lambda: int(redis_server.client().llen("botd:hist:" + thread.redis_suffix()))  # noqa: E731
                return await settled(lambda: shown(uid), complete(before, history))

            await answered_from_files(ask)
            assert len(fake.file_tokens) == 2  # each file fetched once


# -- Slack (a channel: one conversation per thread) ---------------------------------------------------------------


async def test_files_shared_in_slack_are_answered_in_their_thread_only(tmp_path, redis_server, monkeypatch):
    from tests.test_intake import SLACK_SIGNING, slack_post

    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SLACK_SIGNING)
    fake = FakeSlack()
    roots: dict[str, str] = {}
    seq = iter(range(100, 1000))
    async with serve(fake.app()) as base:
        fake.base = base
        cfg = files_config(tmp_path, redis_server.url, slack={"assistant": {
            "bot_token": "env:SLACK_BOT_TOKEN", "mode": "http", "api_base": base + "/api/",
            "signing_secret": "env:SLACK_SIGNING_SECRET", "update_interval_s": 0.5}})
        async with running_daemon(cfg) as api:
            api.url = api.base

            def shown(root: str) -> str:
                texts = [m["text"] for m in fake.posted.values() if m["thread_ts"] == root]
                return "\n".join(texts)

            async def ask(who: str, text: str, file: File | None) -> str:
                n = next(seq)
                ts = f"{1700001000 + n}.000200"
                root = roots.setdefault(who, ts)  # the first message of each member starts a thread
                event: dict[str, Any] = {"type": "message", "channel_type": "channel", "channel": "C1",
                                         "user": f"U{who.upper()}", "text": f"<@UBOT> {text}".strip(), "ts": ts}
                if root != ts:
                    event["thread_ts"] = root
                if file is not None:
                    fid = f"F{n}"
                    fake.files.put(fid, file[2])
                    event |= {"subtype": "file_share", "files": [{
                        "id": fid, "name": file[0], "mimetype": file[1], "size": len(file[2]), "mode": "hosted",
                        "url_private_download": fake.file_url(fid, file[0])}]}
                payload = {"team_id": "T1", "api_app_id": "A1", "type": "event_callback", "event_id": f"Ev{n}",
                           "event_time": int(time.time()), "event": event}
                thread = ThreadKey("slack", "assistant", "C1", root)
                before = await stored_turns(redis_server, thread)
                posted = len(fake.posted)
                assert await slack_post(api, payload) == 200
                history = lambda: int(redis_server.client().llen("botd:hist:" + thread.redis_suffix()))  # noqa: E731

                def latest() -> str:  # this message's answer: what was posted in its thread since
                    new = [m["text"] for ts_, m in list(fake.posted.items())[posted:] if m["thread_ts"] == root]
                    return "\n".join(new)
                return await settled(latest, complete(before, history))

            await answered_from_files(ask)
            assert fake.file_auth == ["Bearer xoxb-test-token"] * 2
            assert shown(roots["b"]) and "report.pdf" not in shown(roots["b"])


# -- WeCom self-built app (one-to-one: two users) ---------------------------------------------------------------


async def test_files_sent_to_a_wecom_app_are_answered_for_their_sender_only(tmp_path, redis_server, monkeypatch):
    from tests.test_intake import wecom_media_xml, wecom_post
    from tests.test_wecom import AES_KEY, CORP, TOKEN, text_xml, wechatpy_encrypt

    monkeypatch.setenv("WECOM_TOKEN", TOKEN)
    monkeypatch.setenv("WECOM_AES_KEY", AES_KEY)
    monkeypatch.setenv("WECOM_SECRET", "app-secret-value")
    fake = FakeWeCom()
    users = {"a": "alice", "b": "bob"}
    ids = iter(range(9000, 10000))
    async with serve(fake.app()) as base:
        cfg = files_config(tmp_path, redis_server.url, wecom={"assistant": {
            "corp_id": CORP, "agent_id": 1000002, "token": "env:WECOM_TOKEN", "encoding_aes_key": "env:WECOM_AES_KEY",
            "secret": "env:WECOM_SECRET", "api_base": base}})
        async with running_daemon(cfg) as api:
            api.url = api.base

            async def one(user: str, xml: str) -> str:
                thread = ThreadKey("wecom", "assistant", user, "")
                before = await stored_turns(redis_server, thread)
                sent = len(fake.sent)
                assert await wecom_post(api, wechatpy_encrypt(xml)) == 200
                history = lambda: int(redis_server.client().llen("botd:hist:" + thread.redis_suffix()))  # noqa: E731
                return await settled(lambda: "".join(b["text"]["content"] for b in fake.sent[sent:]
                                                     if b["touser"] == user), complete(before, history))

            async def ask(who: str, text: str, file: File | None) -> str:
                # A WeCom app message is a file or a text: a file with a question is the file, then the text.
                user, shown = users[who], ""
                if file is not None:
                    media = f"MEDIA{next(ids)}"
                    fake.files.put(media, file[2])
                    shown = await one(user, wecom_media_xml(user, "file", media, next(ids),
                                                            f"<FileName>{file[0]}</FileName>"))
                if text:
                    shown = await one(user, text_xml(user, text, next(ids)))
                return shown

            await answered_from_files(ask)


# -- the HTTP API (OpenAI-style content parts) ------------------------------------------------------------------


async def test_files_sent_as_api_content_parts_are_answered_in_their_conversation_only(tmp_path, redis_server):
    import base64

    def data_url(file: File) -> str:
        return f"data:{file[1]};base64," + base64.b64encode(file[2]).decode()

    async with running_daemon(files_config(tmp_path, redis_server.url)) as api:
        async def ask(who: str, text: str, file: File | None) -> str:
            content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            if file is not None:
                content.append({"type": "file", "file": {"filename": file[0], "file_data": data_url(file)}})
            status, data, _ = await api.post("/v1/chat/completions", {
                "messages": [{"role": "user", "content": content}], "conversation_id": f"conv-{who}"})
            assert status == 200, data
            return str(data["choices"][0]["message"]["content"])

        await answered_from_files(ask)
        # What the API refuses, before anything is read: a URL to fetch, a file id, broken base64,
        # a file with no conversation to belong to.
        pdf = {"type": "file", "file": {"filename": "a.pdf", "file_data": data_url(PDF)}}
        for part, cid in (({"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}, "c"),
                          ({"type": "file", "file": {"file_id": "file-abc"}}, "c"),
                          ({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, "c"),
                          (pdf, None)):
            body: dict[str, Any] = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
            if cid:
                body["conversation_id"] = cid
            status, data, _ = await api.post("/v1/chat/completions", body)
            assert status == 400 and data["error"]["code"] == "invalid_content", data


async def test_the_console_pages_file_picker_sends_a_file_with_the_message(tmp_path, redis_server, monkeypatch):
    """The chat page in Chromium: a PDF picked and sent without words is acknowledged; the next
    question is answered from it, the file among the sources (skipped without Chromium)."""
    pytest.importorskip("playwright")
    from tests.test_console import KEY, USERS

    try:
        from tests.test_console_browser import chromium, login
    except pytest.skip.Exception as exc:  # no Chromium here: the same reason as the console's browser tests
        pytest.skip(str(exc))
    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", KEY)
    doc = tmp_path / PDF[0]
    doc.write_bytes(PDF[2])
    cfg = files_config(tmp_path, redis_server.url, bots={"hr": {"language": "en"}},
                       console={"enabled": True, "signing_key": "env:BOTD_TEST_CONSOLE_KEY",
                                "users": {"alice": USERS["alice"]}})
    from playwright.async_api import expect

    async with running_daemon(cfg) as api, chromium() as browser:
        context = await browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
        page = await login(context, api.base, "alice")
        await page.locator("#file").set_input_files(str(doc))
        await page.press("#text", "Enter")
        await expect(page.locator("#log .msg.user .text").last).to_contain_text("📎 report.pdf")
        await expect(page.locator("#log .msg.assistant .text").last).to_contain_text(
            "Got report.pdf (2 pages), ask away.", timeout=60_000)
        assert await page.locator("#file").evaluate("e => e.files.length") == 0  # sent once, not with every message
        await page.fill("#text", BUDGET_Q)
        await page.press("#text", "Enter")
        await expect(page.locator("#log .msg.assistant .sources").last).to_contain_text("report.pdf",
                                                                                       timeout=60_000)
