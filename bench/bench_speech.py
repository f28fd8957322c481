"""Benchmark (issue 28 item 3): speech-to-text of voice messages on this box.

Speech synthesised by espeak-ng (tests/media_samples.py: four English sentences, and four Chinese
ones spoken from tone-numbered pinyin, since Debian's espeak-ng lacks the full Mandarin
dictionary), encoded as the platforms send voice (``--formats``: OGG/Opus for Telegram and Feishu,
AMR-NB for WeCom, AAC in MP4 for Slack, SILK v3), then decoded and transcribed by botd's path
(core/media/speech.py: PyAV / silk-python, faster-whisper int8 on ``--threads`` threads, greedy,
one pass) with the model of ``--model`` (default: the packaged whisper-base, joined and checked
under a temporary folder). Per language and format: word error rate (English), character error
rate (spaces and punctuation ignored), seconds per clip (decoding + transcribing) and the
real-time factor (seconds spent ÷ seconds of speech), with the language given (``[voice]
language = "en"``/``"zh"``) and detected (``"auto"``). espeak-ng's voices are robotic, its
Mandarin most of all: the rates are far worse than for people speaking; they compare models
and settings, they do not predict what users get.

    .venv/bin/python bench/bench_speech.py                         # OGG and AMR, whisper-base
    .venv/bin/python bench/bench_speech.py --formats ogg,amr,m4a,silk --model /srv/faster-whisper-small
    .venv/bin/python bench/bench_speech.py --smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.media.speech import Transcriber, available  # noqa: E402
from tests.media_samples import EN_SPEECH, ZH_SPEECH, cer, encode, espeak, synthesise_wav, wer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="a CTranslate2 Whisper folder (default: the packaged whisper-base)")
    ap.add_argument("--formats", default="ogg,amr", help="of ogg, amr, m4a, silk, wav")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", type=int, default=130, help="espeak-ng words per minute")
    ap.add_argument("--smoke", action="store_true", help="one sentence per language, one format")
    args = ap.parse_args()
    if not available():
        print("the extra botd[voice] is not installed (pip install 'botd[voice]')")
        return 1
    if espeak() is None:
        print("espeak-ng is not installed (Debian package espeak-ng)")
        return 1
    formats = ["ogg"] if args.smoke else args.formats.split(",")
    n = 1 if args.smoke else len(EN_SPEECH)
    clips = [("en", s, synthesise_wav(s, "en", args.speed)) for s in EN_SPEECH[:n]]
    clips += [("zh", zh, synthesise_wav(py, "zh", args.speed)) for zh, py in ZH_SPEECH[:n]]

    with tempfile.TemporaryDirectory(prefix="bench-speech-") as tmp:
        t = Transcriber(args.model, Path(tmp), args.threads)
        started = time.perf_counter()
        t._load()
        print(f"model {args.model or 'whisper-base (packaged)'}: loaded in {time.perf_counter() - started:.2f} s "
              f"(joining and checking the packaged files included), {args.threads} threads", flush=True)
        rows = []
        for fmt in formats:
            for mode in ("given", "auto"):
                for lang in ("en", "zh"):
                    wers, cers, secs, speech_s, langs = [], [], [], [], []
                    for clip_lang, said, wav in clips:
                        if clip_lang != lang:
                            continue
                        data = encode(wav, fmt)
                        got = t.transcribe_now(data, 120, lang if mode == "given" else "auto")
                        secs.append(got.seconds)
                        speech_s.append(got.audio_s)
                        cers.append(cer(said, got.text))
                        wers.append(wer(said, got.text))
                        langs.append(got.language)
                        print(f"  {fmt:<4} {mode:<5} {lang}  {said!r} -> {got.text!r}  {got.seconds:.2f} s", flush=True)
                    rows.append(f"  {fmt:<4} language {mode:<5} {lang}: "
                                + (f"WER {statistics.mean(wers):.3f}  " if lang == "en" else "")
                                + f"CER {statistics.mean(cers):.3f}  s/clip {statistics.mean(secs):.2f}  "
                                f"real-time factor {sum(secs) / sum(speech_s):.2f}  "
                                f"heard as {', '.join(sorted(set(langs)))}  (n={len(secs)})")
        t.close()
    print("\nspeech-to-text of synthesised voice messages\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
