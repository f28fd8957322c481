"""Pictures sent in chat: the text in a screenshot is read on this box and reaches the model.

core/media/ocr.py alone (the real RapidOCR models from its wheel, one engine for the module):
generated screenshots of Chinese and English text (the box's fonts, tests/media_samples.py) are
read with a low character error rate; hostile pictures (a decompression bomb, a file that is no
picture, a format not on the list) are refused before the model sees them. Then through a real
daemon (only the platform is faked, by a reply target that serves the picture): with
``images = "ocr"`` the prompt holds the screenshot's text marked "[图片文字]"; with the default
"off" the picture is not fetched and the user is told pictures are not read.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from bots import texts
from bots.answers import JobAnswer, TextAnswer
from core.media.ocr import Ocr, OcrLimits, PictureRefused, load_picture
from core.messages import Attachment, InboundMessage
from tests.chat_platform import ChatPlatform, ask
from tests.helpers import make_config, running_daemon
from tests.media_samples import EN_LINES, ZH_LINES, cer, cjk_font, latin_font, render, screenshots

pytestmark = pytest.mark.skipif(cjk_font() is None, reason="no CJK font on this box (Debian fonts-wqy-microhei)")


@pytest.fixture(scope="module")
def ocr():
    engine = Ocr()
    yield engine
    engine.close()


def test_generated_screenshots_are_read_in_chinese_and_english(ocr):
    shots = screenshots(2, seed=5)
    assert {s.lang for s in shots} == {"zh", "en"}
    for shot in shots:
        got = ocr.read_now(shot.png)
        assert cer(shot.text, got.text) <= 0.05, (shot.name, shot.text, got.text)
        assert got.lines == shot.text.count("\n") + 1, got.text


def test_a_picture_with_no_text_reads_as_empty_and_alpha_is_flattened(ocr):
    blank = io.BytesIO()
    Image.new("RGB", (320, 200), (255, 255, 255)).save(blank, "PNG")
    assert ocr.read_now(blank.getvalue()).text == ""
    # A transparent PNG (a copied screenshot often is one): dark text on transparent, read on white.
    src = Image.open(io.BytesIO(render([EN_LINES[0]], latin_font(), size=22)))
    rgba = src.convert("RGBA")
    rgba.putalpha(Image.eval(src.convert("L"), lambda v: 255 - v))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert cer(EN_LINES[0], ocr.read_now(buf.getvalue()).text) <= 0.05


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds a few bytes of compressed zeros."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


def test_hostile_pictures_are_refused_before_the_model_reads_them():
    limits = OcrLimits(max_pixels=40_000_000)
    # A decompression bomb: 60,000 x 60,000 declared in a 100-byte file; refused from its header.
    with pytest.raises(PictureRefused) as bomb:
        load_picture(_png_header(60_000, 60_000), limits)
    assert bomb.value.reason == "too_large"
    for junk in (b"not a picture at all", b"%PDF-1.4\n" + b"0" * 100, b"\x89PNG\r\n\x1a\n" + b"\0" * 40):
        with pytest.raises(PictureRefused) as bad:
            load_picture(junk, limits)
        assert bad.value.reason == "unreadable"
    tiff = io.BytesIO()
    Image.new("RGB", (50, 50)).save(tiff, "TIFF")
    with pytest.raises(PictureRefused) as fmt:
        load_picture(tiff.getvalue(), limits)
    assert fmt.value.reason == "format"
    # A large picture is scaled down to work_pixels before it is read.
    big = io.BytesIO()
    Image.new("RGB", (4000, 3000), (255, 255, 255)).save(big, "JPEG")
    arr = load_picture(big.getvalue(), OcrLimits(work_pixels=1_000_000))
    assert arr.shape[0] * arr.shape[1] <= 1_000_000 and arr.shape[2] == 3


async def test_a_slow_picture_times_out_without_blocking_the_loop(ocr):
    shot = screenshots(1, seed=2)[0]
    with pytest.raises(PictureRefused) as late:
        await ocr.read(shot.png, OcrLimits(timeout_s=0.001))
    assert late.value.reason == "timeout"
    assert (await ocr.read(shot.png)).text  # the worker is free again afterwards


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_ocr_opens_no_network_connection(tmp_path):
    """onnxruntime 1.31 resolves its telemetry host every few seconds unless ORT_DISABLE_TELEMETRY
    is set before it starts: a child reads pictures for 12 s under strace, and sends nothing."""
    shot = tmp_path / "shot.png"
    shot.write_bytes(screenshots(1, seed=3)[0].png)
    code = ("import sys, time; from core.media.ocr import Ocr; o = Ocr(); d = open(sys.argv[1], 'rb').read()\n"
            "end = time.monotonic() + 12\n"
            "while time.monotonic() < end: o.read_now(d); time.sleep(1)\n")
    log = tmp_path / "strace.txt"
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(log),
                    sys.executable, "-c", code, str(shot)], check=True, cwd=Path(__file__).parent.parent,
                   env=env, timeout=120, capture_output=True)
    calls = [line for line in log.read_text().splitlines() if "AF_INET" in line or "htons(" in line]
    assert calls == [], calls[:5]


# -- through the daemon ---------------------------------------------------------------------------


def _msg(text: str, ref: str, bot: str = "assistant") -> InboundMessage:
    return InboundMessage(platform="telegram", bot=bot, chat="c1", user="u1", text=text, thread="",
                          attachments=[Attachment("image", mime="image/png", ref={"id": ref})])


async def test_a_screenshot_s_text_reaches_the_model_marked_as_from_a_picture(tmp_path, redis_server):
    zh = render([ZH_LINES[0], ZH_LINES[8]], cjk_font() or "", size=20)
    en = render([EN_LINES[6]], latin_font(), size=20, jpeg=70)
    blank = io.BytesIO()
    Image.new("RGB", (200, 100), (250, 250, 250)).save(blank, "PNG")
    platform = ChatPlatform({"zh": zh, "en": en, "blank": blank.getvalue(), "bomb": _png_header(60_000, 60_000)})
    cfg = make_config(tmp_path, redis_server.url, model={"max_tokens": 4},
                      bots={"assistant": {"language": "en", "images": "ocr"}, "plain": {"language": "en"}})
    async with running_daemon(cfg) as api:
        service = api.daemon.service

        answer = await ask(service, _msg("What does this error mean?", "zh"), platform)
        assert isinstance(answer, JobAnswer), answer
        asked = answer.job.request.messages[-1]["content"]
        assert asked.startswith("What does this error mean?")
        assert "[图片文字]" in asked
        shown = asked.split("[图片文字]", 1)[1]
        assert cer(f"{ZH_LINES[0]}\n{ZH_LINES[8]}", shown) <= 0.05, shown

        # A screenshot with no words of the user's: its text is the question.
        alone = await ask(service, _msg("", "en"), platform)
        assert isinstance(alone, JobAnswer), alone
        assert "libssl" in alone.job.request.messages[-1]["content"]

        # No text in the picture, or a bomb: a clear text, no generation.
        empty = await ask(service, _msg("what is this", "blank"), platform)
        assert isinstance(empty, TextAnswer) and empty.text == texts.say("IMAGE_NO_TEXT", "en")
        bomb = await ask(service, _msg("what is this", "bomb"), platform)
        assert isinstance(bomb, TextAnswer) and bomb.text == texts.say("IMAGE_TOO_LARGE", "en", mb=10, mp=40)

        # A bot without images = "ocr" (the default): the picture is not even fetched.
        before = platform.downloads
        plain = await ask(service, _msg("What does this error mean?", "zh", bot="plain"), platform)
        assert isinstance(plain, TextAnswer) and plain.text == texts.say("NOT_IMAGE", "en")
        assert platform.downloads == before


async def test_pictures_whose_callers_gave_up_are_not_read():
    """A picture still queued behind another when its turn stops waiting is dropped, not read later."""
    import threading

    from core.lowprio import IdleWorker

    worker = IdleWorker("test")
    gate = threading.Event()
    ran: list[int] = []
    try:
        first = asyncio.ensure_future(worker.run(lambda: (gate.wait(10), ran.append(1)), 5))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await worker.run(lambda: ran.append(2), 0.2)
        gate.set()
        await first
        await worker.run(lambda: ran.append(3), 5)
        assert ran == [1, 3]
    finally:
        worker.close()
