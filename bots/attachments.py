"""Attachments read into a message's turn: the one place the bots layer reads them.

A message may carry files, pictures and voice messages (:class:`core.messages.Attachment`:
the connector keeps the platform's handle only). :meth:`AttachmentReader.take` reads each one
through the reader registered for its kind (:data:`READERS`) and sums up what they gave in an
:class:`Intake`; the answer pipeline (``AnswerPipeline.dispatch(msg, download=...)``) calls it
inside the thread's turn, after the user's limits, before retrieval. Platform delivery passes
its reply target's ``download``; another edge (the console) passes its own; an edge that
passes none gets each attachment refused as unavailable.

What a reader gives back, :class:`Reading` (one per attachment):

- ``text``: words added to the turn after the user's own (a picture's text, marked
  "[图片文字] …"; a voice message's transcript): the model reads them as the question;
- ``note``: shown to the user before the answer (a voice message's "🎤 …", so that a misheard
  question can be seen);
- ``files``: documents taken into the thread's temporary knowledge
  (:class:`core.knowledge.thread_files.ThreadFiles`), searched with the bot's bases for the
  next turns of this thread only and cited by file name;
- ``refusal``: a user-facing text (bots/texts.py, in the message's language) when it could not
  be read; any refusal makes the message's answer the refusals (and what was taken), nothing
  else.

Registry: ``READERS = {"file": read_file, "image": read_image, "voice": read_voice}``, each an
``async (attachment, ReadContext) -> Reading``. Pictures and voice go through two hooks,
:func:`image_text` and :func:`voice_text`, which give the recognised text or None ("not read
here": the message is told it reads text only for that kind).

A file sent without a question is acknowledged ("收到 report.pdf（12 页），请提问" / "Got
report.pdf (12 pages), ask away"); with the bot's ``summarise_files``, the model then writes a
one-paragraph summary from the file's opening chunks (:attr:`Intake.summarise`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from bots import texts
from connectors.reply import AttachmentTooLarge, AttachmentUnavailable
from core.config import BotConfig, Config
from core.knowledge.retriever import Hit
from core.knowledge.thread_files import MAX_NAME, FileRefused, TakenFile, ThreadFiles
from core.media.ocr import OcrLimits, OcrUnavailable, PictureRefused, shared_ocr
from core.media.speech import SpeechUnavailable, VoiceRefused, available, shared_transcriber
from core.messages import Attachment, AttachmentKind, InboundMessage

log = structlog.get_logger("botd.attachments")

# ``download(attachment, max_bytes) -> bytes``: a reply target's (or another edge's) fetch.
Download = Callable[[Attachment, int], Awaitable[bytes]]

MB = 1 << 20
# Marks the text read from a picture in the turn: the model (and the history) can tell it from
# the user's own words.
IMAGE_MARK = "[图片文字]"


@dataclass(frozen=True, slots=True)
class Reading:
    """What reading one attachment gave (see the module's docstring)."""

    text: str = ""
    note: str = ""
    files: tuple[TakenFile, ...] = ()
    refusal: str | None = None


@dataclass(frozen=True, slots=True)
class ReadContext:
    """What a reader may use: the message, its bot, the config, the language of botd's texts,
    the edge's download, and the thread's files."""

    msg: InboundMessage
    bot: BotConfig
    cfg: Config
    lang: texts.Lang
    download: Download | None
    files: ThreadFiles

    async def fetch(self, att: Attachment, max_bytes: int) -> bytes:
        """The attachment's bytes, at most ``max_bytes`` (AttachmentTooLarge / AttachmentUnavailable)."""
        if self.download is None:
            raise AttachmentUnavailable("this edge cannot download attachments")
        return await self.download(att, max_bytes)


Reader = Callable[[Attachment, ReadContext], Awaitable[Reading]]


@dataclass(slots=True)
class Intake:
    """Everything a message's attachments gave, as the answer pipeline uses it."""

    question: str  # the user's own words
    added: list[str] = field(default_factory=list)  # texts the attachments add to the turn
    notes: list[str] = field(default_factory=list)
    files: list[TakenFile] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    lang: texts.Lang = "both"

    @property
    def text(self) -> str:
        """The turn's text: the user's words, then what the attachments added."""
        return "\n\n".join(t for t in (self.question.strip(), *self.added) if t.strip())

    @property
    def note(self) -> str:
        """Shown before the answer (voice quotes)."""
        return "".join(f"{n}\n\n" for n in self.notes if n)

    def acknowledgement(self) -> str:
        """"Got report.pdf (12 pages), ask away" for each file taken."""
        return "\n".join(texts.say("FILE_RECEIVED", self.lang, name=f.name, size=size_text(f, self.lang))
                         for f in self.files)

    def reply(self, summarise: bool) -> str | None:
        """The fixed answer instead of the model's (refusals; a file without a question, when
        not summarised); None: the model answers :attr:`text`."""
        if self.refusals:
            return "\n".join([*self.refusals, *([self.acknowledgement()] if self.files else [])])
        if not self.text.strip() and self.files and not summarise:
            return self.acknowledgement()
        return None

    def summarise(self) -> bool:
        """Whether the model is asked for a summary (files, and no question of the user's)."""
        return bool(self.files) and not self.refusals and not self.text.strip()

    def opening(self) -> list[Hit]:
        """The files' opening chunks, for a summary."""
        return [h for f in self.files for h in f.opening]


def size_text(f: TakenFile, lang: texts.Lang) -> str:
    """"12 页" / "12 pages" for a PDF, "2400 字" / "2,400 characters" for the rest; both with "both"."""
    if lang == "both":
        return f"{size_text(f, 'zh')} / {size_text(f, 'en')}"
    if f.pages:
        return texts.say("FILE_PAGES", lang, n=f.pages)
    return texts.say("FILE_CHARS", lang, n=f"{f.chars:,}" if lang == "en" else f.chars)


# -- the readers --------------------------------------------------------------------------------


async def read_file(att: Attachment, ctx: ReadContext) -> Reading:
    """A document (PDF, Word .docx, Markdown, text) into the thread's temporary knowledge."""
    name = " ".join(att.name.split())[:MAX_NAME] or "file"  # as the thread's knowledge keeps it
    files = ctx.files
    if not files.enabled:
        return Reading(refusal=texts.say("NOT_TEXT", ctx.lang))  # [files] enabled = false: as before
    try:
        # Type, size and the thread's and user's limits are checked before anything is fetched.
        taken = await files.take(ctx.msg.thread_key, ctx.msg.quota_key, file_id(ctx.msg, att), att.name, att.mime,
                                 att.size, lambda most: ctx.fetch(att, most))
    except FileRefused as exc:
        log.info("file refused", file=name, reason=exc.reason, detail=exc.detail)
        return Reading(refusal=refusal_text(exc, name, ctx.lang))
    except AttachmentTooLarge:
        log.info("file refused", file=name, reason="too_large")
        return Reading(refusal=texts.say("FILE_TOO_LARGE", ctx.lang, name=name, mb=files.max_bytes // MB))
    except AttachmentUnavailable as exc:
        log.warning("file could not be fetched", file=name, error=str(exc))
        return Reading(refusal=texts.say("FILE_UNAVAILABLE", ctx.lang, name=name))
    return Reading(files=(taken,))


def refusal_text(exc: FileRefused, name: str, lang: texts.Lang) -> str:
    """The user's text for a refused file, by its typed reason (never from the error's words,
    except an unreadable file's technical detail, quoted as the parser gave it)."""
    fields = {"name": name, **exc.fields}
    key = {"type": "FILE_TYPE", "too_large": "FILE_TOO_LARGE", "thread_full": "FILE_THREAD_FULL",
           "user_limit": "FILE_USER_LIMIT", "unreadable": "FILE_UNREADABLE", "empty": "FILE_EMPTY",
           "too_long": "FILE_TOO_LONG", "unavailable": "FILE_UNAVAILABLE"}[exc.reason]
    return texts.say(key, lang, **fields)


def file_id(msg: InboundMessage, att: Attachment) -> str:
    """One attachment of one message: a replayed message finds its file already taken."""
    return f"{msg.request_id}-{msg.attachments.index(att)}"


async def image_text(data: bytes, cfg: Config, bot: BotConfig, lang: texts.Lang) -> str | None:
    """The text in a picture (OCR, core/media/ocr.py, off the event loop at lowest priority),
    marked "[图片文字] …"; "" when it holds none; None when pictures are not read for this bot
    (images = "off"). Raises PictureRefused and OcrUnavailable."""
    if bot.images != "ocr":
        return None
    images = cfg.images
    limits = OcrLimits(max_pixels=images.max_pixels, work_pixels=images.work_pixels, max_lines=images.max_lines,
                       timeout_s=images.timeout_s, threads=images.threads)
    result = await shared_ocr(limits).read(data, limits)
    log.info("picture read", lines=result.lines, chars=len(result.text), seconds=round(result.seconds, 2))
    return f"{IMAGE_MARK} {result.text}" if result.text.strip() else ""


async def voice_text(att: Attachment, data: bytes, cfg: Config, bot: BotConfig, lang: texts.Lang) -> str | None:
    """What a voice message says (local speech-to-text: core/media/speech.py, off the event loop
    at lowest priority); None when it is not transcribed here ([voice] enabled = false, or the
    extra botd[voice] not installed). Raises VoiceRefused and SpeechUnavailable."""
    voice = cfg.voice
    if not voice.enabled or not available():
        return None
    heard = await shared_transcriber(voice.model, cfg.server.state_dir, voice.threads).transcribe(
        data, voice.max_duration_s, voice.language, voice.timeout_s)
    log.info("voice message transcribed", audio_s=round(heard.audio_s, 1), language=heard.language,
             seconds=round(heard.seconds, 2))
    return heard.text


async def read_image(att: Attachment, ctx: ReadContext) -> Reading:
    images = ctx.cfg.images
    if ctx.bot.images != "ocr":  # not fetched at all
        return Reading(refusal=texts.say("NOT_IMAGE", ctx.lang))
    too_large = texts.say("IMAGE_TOO_LARGE", ctx.lang, mb=images.max_mb, mp=images.max_pixels // 1_000_000)
    try:
        data = await ctx.fetch(att, images.max_mb * MB)
        found = await image_text(data, ctx.cfg, ctx.bot, ctx.lang)
    except AttachmentTooLarge:
        return Reading(refusal=too_large)
    except PictureRefused as exc:
        log.info("picture refused", reason=exc.reason, detail=exc.detail[:200])
        return Reading(refusal=too_large if exc.reason == "too_large" else texts.say("IMAGE_UNREADABLE", ctx.lang))
    except (AttachmentUnavailable, OcrUnavailable) as exc:
        log.warning("picture not read", error=f"{type(exc).__name__}: {exc}")
        found = None
    if found is None:
        return Reading(refusal=texts.say("NOT_IMAGE", ctx.lang))
    if not found:
        return Reading(refusal=texts.say("IMAGE_NO_TEXT", ctx.lang))
    return Reading(text=found)


async def read_voice(att: Attachment, ctx: ReadContext) -> Reading:
    heard = att.transcript.strip() if att.transcript else None  # the platform's own transcript
    voice = ctx.cfg.voice
    if heard is None and voice.enabled and available():
        try:
            data = await ctx.fetch(att, voice.max_mb * MB)
            heard = await voice_text(att, data, ctx.cfg, ctx.bot, ctx.lang)
        except AttachmentTooLarge:
            return Reading(refusal=texts.say("VOICE_TOO_LONG", ctx.lang, s=voice.max_duration_s))
        except VoiceRefused as exc:
            log.info("voice message refused", reason=exc.reason, detail=exc.detail[:200])
            key = "VOICE_TOO_LONG" if exc.reason == "too_long" else "VOICE_UNREADABLE"
            return Reading(refusal=texts.say(key, ctx.lang, s=voice.max_duration_s))
        except (AttachmentUnavailable, SpeechUnavailable) as exc:
            log.warning("voice message not read", error=f"{type(exc).__name__}: {exc}")
            heard = None
        else:
            if heard == "":
                return Reading(refusal=texts.say("VOICE_UNREADABLE", ctx.lang))
    if not heard:
        return Reading(refusal=texts.say("NOT_VOICE", ctx.lang))
    return Reading(text=heard, note=f"🎤 {heard}")


READERS: dict[AttachmentKind, Reader] = {"file": read_file, "image": read_image, "voice": read_voice}


class AttachmentReader:
    """Reads a message's attachments into its turn (see the module's docstring)."""

    def __init__(self, files: ThreadFiles) -> None:
        self.files = files

    async def take(self, msg: InboundMessage, bot: BotConfig, cfg: Config, lang: texts.Lang,
                   download: Download | None) -> Intake:
        ctx = ReadContext(msg, bot, cfg, lang, download, self.files)
        intake = Intake(question=msg.text, lang=lang)
        for att in msg.attachments:
            reader = READERS.get(att.kind)
            reading = await reader(att, ctx) if reader is not None else \
                Reading(refusal=texts.say("NOT_TEXT", lang))
            if reading.text:
                intake.added.append(reading.text)
            if reading.note:
                intake.notes.append(reading.note)
            intake.files.extend(reading.files)
            if reading.refusal:
                intake.refusals.append(reading.refusal)
        return intake
