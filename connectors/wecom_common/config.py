"""What WeCom's self-built apps ([wecom.NAME]) and AI bots ([wecom_aibot.NAME]) share in their
config: the form of an EncodingAESKey."""

from __future__ import annotations

import base64
import binascii


def encoding_aes_key_problem(value: str) -> str:
    try:
        ok = len(value) == 43 and len(base64.b64decode(value + "=", validate=True)) == 32
    except (binascii.Error, ValueError):
        ok = False
    return "" if ok else "an EncodingAESKey is 43 characters of base64 (from the WeCom admin)"
