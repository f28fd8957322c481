"""Generated test media for OCR and voice: screenshots of Chinese and English text rendered with
the box's fonts (Pillow), and error rates against the text that was rendered or spoken.

Used by tests/test_ocr*.py, tests/test_voice*.py and bench/bench_ocr.py, bench/bench_speech.py.
The fonts: WenQuanYi Micro Hei (Debian ``fonts-wqy-microhei``) for Chinese, DejaVu Sans for
English; scripts/install.sh's test path installs both, and the speech synthesiser (espeak-ng).
"""

from __future__ import annotations

import io
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
)
LATIN_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
)

# What people screenshot at work: error dialogs, settings, chat lines, tables of figures.
ZH_LINES = (
    "错误：无法连接到服务器，请检查网络设置",
    "报销单已提交，等待部门经理审批",
    "打印机缺纸，请在纸盒中放入纸张后重试",
    "会议室预订成功：三楼东侧，下午两点",
    "您的密码将在七天后过期，请及时修改",
    "系统维护通知：本周六晚上十点至十二点",
    "订单编号 20261206 已发货，预计明天送达",
    "请假申请被退回，原因：缺少证明材料",
    "磁盘空间不足，剩余容量低于百分之五",
    "登录失败次数过多，账户已被临时锁定",
    "年度预算表请在月底前提交给财务部",
    "新员工入职培训安排在下周一上午九点",
)
EN_LINES = (
    "Error: connection refused by the server",
    "Your expense report was submitted for approval",
    "The printer is out of paper in tray two",
    "Meeting room booked for Tuesday at 3 pm",
    "Your password expires in seven days",
    "Disk quota exceeded on the shared drive",
    "Build failed: missing dependency libssl",
    "Invoice 4471 is overdue by twelve days",
    "VPN session timed out, please sign in again",
    "The backup finished with two warnings",
    "Access denied: ask your manager for permission",
    "Payroll closes on Friday at noon",
)


def cjk_font() -> str | None:
    """A font file that draws Chinese, or None when the box has none."""
    return next((f for f in CJK_FONTS if Path(f).is_file()), None)


def latin_font() -> str:
    return next((f for f in LATIN_FONTS if Path(f).is_file()), LATIN_FONTS[0])


@dataclass(frozen=True)
class Screenshot:
    name: str
    lang: str  # "zh" or "en"
    text: str  # the lines rendered, one per line
    png: bytes


def render(lines: list[str], font_path: str, size: int = 20, dark: bool = False, width: int = 640,
           jpeg: int = 0) -> bytes:
    """A PNG of ``lines`` as a screenshot shows them: a window-like panel, one line under another
    (a JPEG of that quality instead when ``jpeg``, as a phone forwards a screenshot)."""
    font = ImageFont.truetype(font_path, size)
    pad, gap = 16, size // 2
    height = pad * 2 + len(lines) * (size + gap) + 28
    bg, fg, bar = ((32, 33, 36), (230, 230, 230), (60, 64, 67)) if dark else ((255, 255, 255), (32, 32, 32),
                                                                           (225, 228, 232))
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, width, 24), fill=bar)  # a title bar, with no text on it
    y = 28 + pad
    for line in lines:
        draw.text((pad, y), line, font=font, fill=fg)
        y += size + gap
    out = io.BytesIO()
    if jpeg:
        img.save(out, "JPEG", quality=jpeg)
    else:
        img.save(out, "PNG")
    return out.getvalue()


def screenshots(n_per_lang: int = 6, seed: int = 7) -> list[Screenshot]:
    """``n_per_lang`` Chinese and as many English screenshots, 2-3 lines each, sizes 14-24 px,
    light and dark, every other one a JPEG at quality 60 (Chinese ones only where the box has a
    CJK font)."""
    rng = random.Random(seed)
    shots: list[Screenshot] = []
    cjk = cjk_font()
    for lang, pool, font in (("zh", ZH_LINES, cjk), ("en", EN_LINES, latin_font())):
        if font is None:
            continue
        for i in range(n_per_lang):
            lines = rng.sample(pool, rng.choice((2, 3)))
            png = render(lines, font, size=rng.choice((14, 16, 18, 20, 24)), dark=i % 3 == 2,
                         jpeg=60 if i % 2 else 0)
            shots.append(Screenshot(f"{lang}-{i}", lang, "\n".join(lines), png))
    return shots


# -- speech --------------------------------------------------------------------------------------

# Each Chinese sentence with its pinyin: Debian's espeak-ng has only the small Mandarin dictionary
# (it reads most characters as English-spelled pinyin), but it speaks tone-numbered pinyin with its
# Mandarin phonemes (voice cmn-latn-pinyin). Still robotic: whisper-base hears it far worse than a
# person (bench/bench_speech.py reports the error rates).
ZH_SPEECH = (
    ("今天下午三点开会", "jin1 tian1 xia4 wu3 san1 dian3 kai1 hui4"),
    ("请帮我查一下报销流程", "qing3 bang1 wo3 cha2 yi2 xia4 bao4 xiao1 liu2 cheng2"),
    ("打印机没有纸了", "da3 yin4 ji1 mei2 you3 zhi3 le5"),
    ("我的密码过期了怎么办", "wo3 de5 mi4 ma3 guo4 qi1 le5 zen3 me5 ban4"),
)
EN_SPEECH = (
    "how do I reset my password",
    "the printer is out of paper",
    "when is the next team meeting",
    "please send me the expense report",
)


def espeak() -> str | None:
    return shutil.which("espeak-ng")


def synthesise_wav(text: str, lang: str, speed: int = 130) -> bytes:
    """WAV bytes of ``text`` spoken by espeak-ng: English (voice ``en-us``), or Chinese given as
    tone-numbered pinyin (voice ``cmn-latn-pinyin``)."""
    exe = espeak()
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian package espeak-ng)")
    voice = {"zh": "cmn-latn-pinyin", "en": "en-us"}[lang]
    return subprocess.run([exe, "-v", voice, "-s", str(speed), "--stdout", text],
                          check=True, capture_output=True, timeout=60).stdout


def encode(wav: bytes, fmt: str) -> bytes:
    """``wav`` re-encoded as a platform sends voice: "ogg" (Opus, Telegram/Feishu), "amr" (AMR-NB,
    WeCom), "m4a" (AAC, Slack), "silk" (SILK v3, Tencent's header), "wav"."""
    import av
    import numpy as np

    if fmt == "wav":
        return wav
    with av.open(io.BytesIO(wav)) as src:
        frames = list(src.decode(audio=0))
    if fmt == "silk":
        import pysilk

        res = av.AudioResampler(format="s16", layout="mono", rate=24000)
        pcm = b"".join(np.asarray(f.to_ndarray()).tobytes() for fr in frames for f in res.resample(fr))
        out = io.BytesIO()
        pysilk.encode(io.BytesIO(pcm), out, 24000, 24000, tencent=True)
        return out.getvalue()
    codec, container, rate = {"ogg": ("libopus", "ogg", 48000), "amr": ("libopencore_amrnb", "amr", 8000),
                              "m4a": ("aac", "mp4", 16000)}[fmt]
    out = io.BytesIO()
    with av.open(out, "w", format=container) as dst:
        stream = dst.add_stream(codec, rate=rate)
        stream.layout = "mono"
        if fmt == "amr":
            stream.bit_rate = 12200
        res = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="mono", rate=rate)
        for fr in frames:
            for f in res.resample(fr):
                for p in stream.encode(f):
                    dst.mux(p)
        for f in res.resample(None):
            for p in stream.encode(f):
                dst.mux(p)
        for p in stream.encode(None):
            dst.mux(p)
    return out.getvalue()


# -- error rates ---------------------------------------------------------------------------------

_PUNCT = re.compile(r"[\s，。、：；！？,.:;!?\"'“”‘’()（）\-]+")


def _distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate, spaces and punctuation ignored, case folded."""
    ref = _PUNCT.sub("", reference).lower()
    hyp = _PUNCT.sub("", hypothesis).lower()
    return _distance(list(ref), list(hyp)) / max(1, len(ref))


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate (English), punctuation ignored, case folded."""
    ref = _PUNCT.sub(" ", reference).lower().split()
    hyp = _PUNCT.sub(" ", hypothesis).lower().split()
    return _distance(ref, hyp) / max(1, len(ref))
