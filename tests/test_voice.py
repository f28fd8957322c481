"""Voice messages: the platform's transcript where it sends one, else speech-to-text on this box.

The platform-transcript path needs nothing but the daemon: a WeCom AI bot / DingTalk voice
message arrives with its ``transcript``; the prompt holds those words, the answer quotes them
("🎤 …") and nothing is downloaded. The local path needs the extra ``botd[voice]`` (faster-whisper,
PyAV, silk-python, the packaged whisper-base) and espeak-ng to synthesise speech; it is skipped,
with that reason, without them. Speech is synthesised in English and in Chinese (from pinyin:
tests/media_samples.py says why), encoded as each platform sends it (OGG/Opus, AMR-NB, AAC in
MP4, SILK v3), decoded by the library, transcribed by the real model (loaded once for the
module), and answered through a real daemon whose platform is faked by a reply target that
serves the bytes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bots import texts
from bots.answers import JobAnswer, TextAnswer
from core.media import speech
from core.media.audio import AudioRefused, decode
from core.messages import Attachment, InboundMessage
from tests.chat_platform import ChatPlatform, ask
from tests.helpers import make_config, running_daemon
from tests.media_samples import EN_SPEECH, ZH_SPEECH, cer, encode, espeak, synthesise_wav, wer

local = pytest.mark.skipif(not speech.available() or espeak() is None,
                           reason="local speech-to-text needs the extra botd[voice] (pip install 'botd[voice]') "
                                  "and espeak-ng (Debian) to synthesise the test speech")


def _voice(ref: str, mime: str = "audio/ogg", transcript: str | None = None, user: str = "u1",
           platform: str = "telegram") -> InboundMessage:
    att = Attachment("voice", mime=mime, ref={"id": ref}, transcript=transcript, duration_s=2.0)
    return InboundMessage(platform=platform, bot="assistant", chat="c1", user=user, text="", thread="",
                          attachments=[att])


def _config(tmp_path: Path, redis_url: str, **voice: Any):
    return make_config(tmp_path, redis_url, model={"max_tokens": 4}, bots={"assistant": {"language": "auto"}},
                       voice={"language": "auto", **voice})


async def test_the_platform_s_transcript_is_answered_and_quoted_without_a_download(tmp_path, redis_server):
    platform = ChatPlatform()
    async with running_daemon(_config(tmp_path, redis_server.url)) as api:
        service = api.daemon.service
        for words in ("今天下午三点开会吗", "how do I reset my password"):
            answer = await ask(service, _voice("v1", transcript=words, platform="wecom_aibot"), platform)
            assert isinstance(answer, JobAnswer), answer
            assert answer.job.request.messages[-1]["content"] == words
            assert answer.final.text.startswith(f"🎤 {words}\n\n"), answer.final.text
        assert platform.downloads == 0
        # The history keeps what was heard as the user's turn.
        turns = await service.history(_voice("v1", platform="wecom_aibot").thread_key)
        assert [t.content for t in turns if t.role == "user"] == ["今天下午三点开会吗", "how do I reset my password"]


async def test_without_local_speech_to_text_a_voice_message_gets_the_clear_text(tmp_path, redis_server):
    platform = ChatPlatform({"v": b"OggS" + b"\0" * 100})
    async with running_daemon(_config(tmp_path, redis_server.url, enabled=False)) as api:
        answer = await ask(api.daemon.service, _voice("v"), platform)
        assert isinstance(answer, TextAnswer) and answer.text == texts.say("NOT_VOICE", "both")
        assert platform.downloads == 0


# -- the local path ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips() -> dict[str, tuple[str, bytes]]:
    """Synthesised speech: name -> (what was said, WAV bytes)."""
    if espeak() is None:
        pytest.skip("espeak-ng is not installed")
    return {"en": (EN_SPEECH[0], synthesise_wav(EN_SPEECH[0], "en")),
            "en2": (EN_SPEECH[1], synthesise_wav(EN_SPEECH[1], "en")),
            "zh": (ZH_SPEECH[1][0], synthesise_wav(ZH_SPEECH[1][1], "zh")),
            "long": (" ".join(EN_SPEECH), synthesise_wav(" ".join(EN_SPEECH), "en"))}


@local
def test_each_platform_s_voice_format_is_decoded_by_the_library(clips):
    wav = clips["en"][1]
    seconds = len(decode(wav, 60)) / 16_000
    assert 1.0 < seconds < 5.0
    for fmt in ("ogg", "amr", "m4a", "silk"):
        data = encode(wav, fmt)
        got = len(decode(data, 60)) / 16_000
        assert abs(got - seconds) < 0.3, (fmt, got, seconds)
    # Too long: refused while decoding, not after.
    with pytest.raises(AudioRefused) as long:
        decode(encode(wav, "ogg"), 1)
    assert long.value.reason == "too_long"
    with pytest.raises(AudioRefused) as junk:
        decode(b"OggS" + b"\x00\xff" * 500, 60)
    assert junk.value.reason == "unreadable"
    # A format no platform sends for voice (here: a GIF picture) is not decoded.
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00" \
          b"\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    with pytest.raises(AudioRefused) as other:
        decode(gif, 60)
    assert other.value.reason in ("format", "unreadable")


@local
def test_the_packaged_whisper_base_is_checked_against_the_published_checksums(tmp_path, monkeypatch):
    folder = speech.packaged_model(tmp_path)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(speech.WHISPER_BASE)
    assert (folder / "model.bin").stat().st_size == speech.WHISPER_BASE["model.bin"][0]
    # A model.bin that does not match what Systran published is not used.
    (folder / ".verified").unlink()
    bad = dict(speech.WHISPER_BASE, **{"model.bin": (speech.WHISPER_BASE["model.bin"][0], "0" * 64)})
    monkeypatch.setattr(speech, "WHISPER_BASE", bad)
    with pytest.raises(speech.SpeechUnavailable):
        speech.packaged_model(tmp_path)
    assert not (folder / "model.bin").exists()
    # A configured folder that does not exist is a clear error naming the key, never a download.
    with pytest.raises(speech.SpeechUnavailable, match=r"\[voice\] model"):
        speech.model_folder(str(tmp_path / "no-such-model"), tmp_path)


@local
async def test_synthesised_speech_is_transcribed_and_answered_locally(tmp_path, redis_server, clips):
    en_said, en_wav = clips["en"]
    en2_wav = clips["en2"][1]
    zh_said, zh_wav = clips["zh"]
    platform = ChatPlatform({"en": encode(en_wav, "ogg"), "en2": encode(en2_wav, "amr"), "zh": encode(zh_wav, "silk"),
                         "junk": b"OggS" + b"\x00\xff" * 500, "long": encode(clips["long"][1], "ogg")})
    async with running_daemon(_config(tmp_path, redis_server.url)) as api:
        service = api.daemon.service
        ticks = 0

        async def ticking() -> None:  # the event loop keeps running while the model listens
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(ticking())
        try:
            answer = await ask(service, _voice("en"), platform)
        finally:
            ticker.cancel()
        assert isinstance(answer, JobAnswer), answer
        heard = answer.job.request.messages[-1]["content"]
        assert wer(en_said, heard) <= 0.34, heard
        assert answer.final.text.startswith(f"🎤 {heard}\n\n")
        assert ticks >= 10

        amr = await ask(service, _voice("en2", mime="audio/amr", platform="wecom"), platform)
        assert isinstance(amr, JobAnswer), amr
        # AMR-NB is telephone quality (8 kHz): the gist, not every word.
        assert "printer" in amr.job.request.messages[-1]["content"].lower()

        junk = await ask(service, _voice("junk"), platform)
        assert isinstance(junk, TextAnswer) and junk.text == texts.say("VOICE_UNREADABLE", "both")

    # An admin whose users speak Chinese sets [voice] language = "zh" (espeak-ng's robotic Mandarin
    # is not recognised as Chinese by language detection).
    async with running_daemon(_config(tmp_path, redis_server.url, language="zh", max_duration_s=6)) as api:
        service = api.daemon.service
        # Chinese (synthesised from pinyin by espeak-ng: robotic, so heard roughly; the rate is
        # reported by bench/bench_speech.py): transcribed in Chinese characters and quoted.
        zh = await ask(service, _voice("zh", mime="audio/silk", platform="wecom"), platform)
        assert isinstance(zh, JobAnswer), zh
        zh_heard = zh.job.request.messages[-1]["content"]
        assert any("\u4e00" <= ch <= "\u9fff" for ch in zh_heard), zh_heard
        assert cer(zh_said, zh_heard) < 1.0, zh_heard
        assert zh.final.text.startswith(f"🎤 {zh_heard}")

        long = await ask(service, _voice("long"), platform)
        assert isinstance(long, TextAnswer) and long.text == texts.say("VOICE_TOO_LONG", "both", s=6)


def test_voice_model_must_be_a_local_whisper_folder(tmp_path):
    """[voice] model names a folder on this box, relative to the config file; a missing one is a
    clear error at load naming the key (never a download at the first voice message)."""
    from connectors.config import config_from_dict
    from core.config import ConfigError

    with pytest.raises(ConfigError, match=r"voice\.model: 'whisper-small' is not a CTranslate2 Whisper folder"):
        config_from_dict({"voice": {"model": "whisper-small"}}, tmp_path / "config.toml", check_secrets=False)
    folder = tmp_path / "whisper-small"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"\0")
    cfg = config_from_dict({"voice": {"model": "whisper-small"}}, tmp_path / "config.toml", check_secrets=False)
    assert cfg.voice.model == str(folder)
