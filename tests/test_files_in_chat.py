"""Files sent in chat, at the bots layer: a real daemon (real model, real embedder, real Redis, the
real parsers in their child process); only the platform is faked, by a reply target whose
``download`` serves the bytes a user sent.

A PDF and a Word file become their thread's own knowledge: answered from, cited by file name, in
that thread only (not another thread, not another member's thread of the same group), gone after
``[files] ttl_s`` and after /reset; a file that is too large, a zip bomb, a wrong type or a damaged
file gets its clear text and changes nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import docx
from fpdf import FPDF

from bots import texts
from bots.answers import JobAnswer, TextAnswer
from bots.prompt import FILE_RULES, KNOWLEDGE_RULES
from core.knowledge.thread_files import THREAD_KB
from core.messages import Attachment, InboundMessage
from tests.chat_platform import ChatPlatform, ask
from tests.helpers import loop_gaps, make_config, running_daemon, wait_for
from tests.test_knowledge_hostile import docx_bomb

BUDGET_FACT = "The Zephyr project budget is 4,250,000 yuan"
BUDGET_Q = "What is the budget of the Zephyr project?"
FLIGHT_FACT = "business class is allowed for flights longer than nine hours"
FLIGHT_Q = "Which class may staff fly on flights longer than nine hours?"


def make_pdf() -> bytes:
    pdf = FPDF()
    pages = [("Zephyr project", f"{BUDGET_FACT}, approved by the board in March. The money covers three "
                                "field sites and two years of staff."),
             ("Schedule", "The first field site opens in the autumn. Reports are due every quarter.")]
    for title, body in pages:
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.cell(0, 10, title, new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 8, body, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def make_docx() -> bytes:
    d = docx.Document()
    d.add_heading("Travel policy", level=1)
    d.add_heading("Flights", level=2)
    d.add_paragraph(f"Economy class is the rule; {FLIGHT_FACT}.")
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


def _file(name: str, ref: str, mime: str = "", size: int | None = None) -> Attachment:
    return Attachment("file", name=name, mime=mime, size=size, ref={"id": ref})


def _msg(text: str, *, user: str = "u1", chat: str = "group1", thread: str | None = None,
         attachments: Sequence[Attachment] = (), bot: str = "assistant") -> InboundMessage:
    # A group with group_history = "member": each member's thread is "/<user>" (as Telegram's is).
    return InboundMessage(platform="telegram", bot=bot, chat=chat, user=user, text=text,
                          thread=f"/{user}" if thread is None else thread, attachments=list(attachments))


def _config(tmp_path: Path, redis_url: str, **files: Any):
    return make_config(tmp_path, redis_url, model={"max_tokens": 4},
                       files={"per_user_per_day": 4, **files},
                       bots={"assistant": {"language": "en"}, "summary": {"language": "en", "summarise_files": True}})


async def _keys(api, pattern: str) -> list[str]:
    return sorted(await api.daemon.runtime.redis.client.keys(pattern))


async def test_a_pdf_and_a_docx_are_answered_from_their_content_in_their_thread_only(tmp_path, redis_server):
    platform = ChatPlatform({"pdf1": make_pdf(), "docx1": make_docx()})
    async with running_daemon(_config(tmp_path, redis_server.url)) as api:
        service = api.daemon.service

        # A file without a question: acknowledged, with its pages; nothing generated.
        ack = await ask(service, _msg("", attachments=[_file("report.pdf", "pdf1", "application/pdf")]), platform)
        assert isinstance(ack, TextAnswer) and ack.text == "Got report.pdf (2 pages), ask away."

        # The next question of that thread is answered from the file, cited by its name.
        first = await ask(service, _msg(BUDGET_Q), platform)
        assert isinstance(first, JobAnswer)
        assert [(h.kb, h.source) for h in first.hits][:1] == [(THREAD_KB, "report.pdf")], first.hits
        asked = first.job.request.messages[-1]["content"]
        assert BUDGET_FACT in asked and "[1] report.pdf › page 1" in asked
        assert "report.pdf › page 1" in first.final.sources
        assert first.final.text.endswith(texts.say("SOURCES", "en", cites="; ".join(first.final.sources)))

        # A Word file sent with its question: taken and answered from at once.
        second = await ask(service, _msg(FLIGHT_Q, attachments=[_file("travel.docx", "docx1")]), platform)
        assert isinstance(second, JobAnswer)
        assert second.hits and second.hits[0].source == "travel.docx" and second.hits[0].heading.startswith(
            "Travel policy"), second.hits
        assert FLIGHT_FACT in second.job.request.messages[-1]["content"]
        # The KV-prefix rule holds: the first question is repeated as it was shown, its file's text in it.
        assert second.job.request.messages[-3]["content"] == asked
        turns = await service.history(_msg("").thread_key)
        assert [t.content for t in turns if t.role == "user"] == [BUDGET_Q, FLIGHT_Q]
        assert turns[0].shown == asked

        # Another member of the same group, and the same user in another chat: not their files.
        for other in (_msg(BUDGET_Q, user="u2"), _msg(BUDGET_Q, chat="group2")):
            answer = await ask(service, other, platform)
            assert isinstance(answer, JobAnswer) and answer.hits == []
            assert "Zephyr project budget" not in json.dumps(answer.job.request.messages)
            assert not answer.final.sources

        # Nothing of the file reached a knowledge base on disk.
        assert not (api.daemon.cfg.server.state_dir / "knowledge").exists()

        # /reset forgets the files with the history.
        reset = await ask(service, _msg("/reset"), platform)
        assert isinstance(reset, TextAnswer) and reset.text == texts.say("RESET_DONE", "en")
        assert await _keys(api, "botd:tfiles:*") == []
        after = await ask(service, _msg(BUDGET_Q), platform)
        assert isinstance(after, JobAnswer) and after.hits == [] and not after.final.sources

        # A bot that summarises: the acknowledgement, then the model's paragraph from the file's opening.
        summed = await ask(service, _msg("", bot="summary", attachments=[_file("report.pdf", "pdf1")]), platform)
        assert isinstance(summed, JobAnswer), summed
        assert summed.final.text.startswith("Got report.pdf (2 pages), ask away.\n\n")
        prompt = summed.job.request.messages[-1]["content"]
        assert BUDGET_FACT in prompt and prompt.endswith("📎 report.pdf\nSummarise this file in one paragraph.")


async def test_a_file_is_forgotten_after_the_ttl(tmp_path, redis_server):
    # Twelve sections of ~700 characters: a dozen chunks to parse and embed (seconds on 2 cores).
    filler = "".join(f"## Site {i}\n\n" + f"Site {i} keeps its own records of visitors and deliveries. " * 12 + "\n\n"
                     for i in range(12))
    platform = ChatPlatform({"md": f"# Parking\n\n{BUDGET_FACT}.\n\n{filler}".encode()})
    async with running_daemon(_config(tmp_path, redis_server.url, ttl_s=8)) as api:
        service = api.daemon.service
        async with loop_gaps() as gaps:
            ack = await ask(service, _msg("", attachments=[_file("notes.md", "md")]), platform)
        assert isinstance(ack, TextAnswer) and ack.text.startswith("Got notes.md ("), ack.text
        # Parsed in a child process, embedded on the files' thread: the event loop kept running.
        assert max(gaps) < 0.5, max(gaps)
        taken_at = time.time()  # the file's own time is earlier: it expires before taken_at + ttl_s
        found = await ask(service, _msg(BUDGET_Q), platform)
        assert isinstance(found, JobAnswer) and [h.source for h in found.hits][:1] == ["notes.md"]
        assert BUDGET_FACT in found.job.request.messages[-1]["content"]
        await asyncio.sleep(max(0.0, 8.2 - (time.time() - taken_at)))
        gone = await ask(service, _msg(BUDGET_Q), platform)
        assert isinstance(gone, JobAnswer) and gone.hits == []
        assert await _keys(api, "botd:tfiles:*") == []  # Redis dropped it too


async def test_bad_files_get_a_clear_text_and_change_nothing(tmp_path, redis_server):
    bomb = docx_bomb(tmp_path / "bomb.docx", 250).read_bytes()  # < 1 MB, unpacks to 250 MB
    platform = ChatPlatform({"big": b"%PDF-1.4\n" + b"0" * (2 << 20), "bomb": bomb, "exe": b"MZ\x90\x00",
                         "fake": b"this is no PDF at all", "pdf": make_pdf()})
    async with running_daemon(_config(tmp_path, redis_server.url, max_file_mb=1)) as api:
        service = api.daemon.service
        cases = [
            (_file("big.pdf", "big", size=2 << 20), texts.say("FILE_TOO_LARGE", "en", name="big.pdf", mb=1), 0),
            (_file("big.pdf", "big"), texts.say("FILE_TOO_LARGE", "en", name="big.pdf", mb=1), 1),  # size unsaid
            (_file("setup.exe", "exe", "application/octet-stream"),
             texts.say("FILE_TYPE", "en", name="setup.exe"), 0),
            (_file("photo.png", "exe", "application/pdf"), texts.say("FILE_TYPE", "en", name="photo.png"), 0),
            (_file("bomb.docx", "bomb"), "Sorry, I cannot read bomb.docx: unpacks to 250 MB", 1),
            (_file("fake.pdf", "fake"), "Sorry, I cannot read fake.pdf: ", 1),
            (_file("gone.pdf", "nothing"), texts.say("FILE_UNAVAILABLE", "en", name="gone.pdf"), 1),
        ]
        for att, told, downloads in cases:
            before = platform.downloads
            answer = await ask(service, _msg("", attachments=[att]), platform)
            assert isinstance(answer, TextAnswer) and answer.text.startswith(told), (att.name, answer.text)
            assert platform.downloads - before == downloads, att.name  # refused before fetching when it can be
            # A question sent with a refused file is not answered: the user sees the refusal only.
            with_q = await ask(service, _msg(BUDGET_Q, attachments=[att]), platform)
            assert isinstance(with_q, TextAnswer) and with_q.text.startswith(told)
        # Nothing changed: no file kept, no history, no file counted against the user.
        assert await _keys(api, "botd:tfiles:*") == [] and await _keys(api, "botd:tfuser:*") == []
        assert await service.history(_msg("").thread_key) == []

        # Per-user limit (4 a day): the fifth file is refused, across threads.
        for i in range(4):
            ok = await ask(service, _msg("", chat=f"c{i}", attachments=[_file("report.pdf", "pdf")]), platform)
            assert isinstance(ok, TextAnswer) and ok.text.startswith("Got report.pdf"), ok.text
        fifth = await ask(service, _msg("", chat="c9", attachments=[_file("report.pdf", "pdf")]), platform)
        assert isinstance(fifth, TextAnswer) and fifth.text == texts.say("FILE_USER_LIMIT", "en", n=4)


async def test_a_thread_holds_at_most_per_thread_files(tmp_path, redis_server):
    platform = ChatPlatform({"a": b"Alpha notes.", "b": b"Beta notes.", "c": b"Gamma notes."})
    async with running_daemon(_config(tmp_path, redis_server.url, per_thread=2)) as api:
        service = api.daemon.service
        for ref in ("a", "b"):
            last = _msg("", attachments=[_file(f"{ref}.txt", ref)])
            ok = await ask(service, last, platform)
            assert isinstance(ok, TextAnswer) and ok.text.startswith(f"Got {ref}.txt ("), ok.text
        full = await ask(service, _msg("", attachments=[_file("c.txt", "c")]), platform)
        assert isinstance(full, TextAnswer) and full.text == texts.say("FILE_THREAD_FULL", "en", n=2)
        assert await api.daemon.runtime.thread_files.names(_msg("").thread_key) == ["a.txt", "b.txt"]

        # A message answered again after a restart (the same request): its file is the one already
        # taken, not a third one: not fetched again, not refused, not counted again.
        again = _msg("", attachments=[_file("b.txt", "b")])
        again.request_id, again.resumed = last.request_id, True
        downloads = platform.downloads
        replayed = await ask(service, again, platform)
        assert isinstance(replayed, TextAnswer) and replayed.text.startswith("Got b.txt ("), replayed.text
        assert platform.downloads == downloads
        assert await api.daemon.runtime.redis.client.get("botd:tfuser:telegram:u1") == "2"

        # A name is one line of a sane length wherever it is shown.
        long = await ask(service, _msg("", user="u3", attachments=[_file("a\nb" + "x" * 500 + ".txt", "a")]),
                          platform)
        assert isinstance(long, TextAnswer) and "\n" not in long.text and len(long.text) < 200, long.text


async def test_a_platform_message_with_a_file_is_read_not_refused(tmp_path, redis_server):
    """Through the delivery (the connectors' one call): a document the platform marks unreadable
    as text, but with an attachment, is taken, not answered "I read text only"."""
    platform = ChatPlatform({"pdf": make_pdf()})
    async with running_daemon(_config(tmp_path, redis_server.url)) as api:
        msg = _msg("", attachments=[_file("report.pdf", "pdf")])
        msg.readable = False
        assert await api.daemon.service.receive(msg, platform)

        async def shown() -> bool:
            return bool(platform.shown)

        await wait_for(shown, timeout=30)
        assert platform.shown == ["Got report.pdf (2 pages), ask away."]


async def test_files_switched_off_are_answered_as_before(tmp_path, redis_server):
    platform = ChatPlatform({"pdf": make_pdf()})
    async with running_daemon(_config(tmp_path, redis_server.url, enabled=False)) as api:
        answer = await ask(api.daemon.service, _msg(BUDGET_Q, attachments=[_file("report.pdf", "pdf")]), platform)
        assert isinstance(answer, TextAnswer) and answer.text == texts.say("NOT_TEXT", "en")
        assert platform.downloads == 0 and await _keys(api, "botd:tf*") == []


async def test_the_first_question_after_a_file_is_about_it_and_a_plain_bot_still_answers_the_rest(
        tmp_path, redis_server):
    """"What is this document about?" shares no words with the document: the first question after a
    file is given the file's opening when nothing else matches. A bot without knowledge bases is not
    told to refuse what its files do not hold: it answers other questions as it always did."""
    platform = ChatPlatform({"pdf": make_pdf()})
    async with running_daemon(_config(tmp_path, redis_server.url)) as api:
        service = api.daemon.service
        await ask(service, _msg("", attachments=[_file("report.pdf", "pdf")]), platform)
        about = await ask(service, _msg("What is this document about?"), platform)
        assert isinstance(about, JobAnswer) and [h.source for h in about.hits][:1] == ["report.pdf"], about.hits
        assert BUDGET_FACT in about.job.request.messages[-1]["content"]
        system = about.job.request.messages[0]["content"]
        assert KNOWLEDGE_RULES not in system and FILE_RULES in system
        # Later, a question the file does not hold gets no document.
        other = await ask(service, _msg("What is the capital of France?"), platform)
        assert isinstance(other, JobAnswer) and other.hits == [], other.hits
