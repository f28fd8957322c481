"""WeCom's callback crypto (WXBizMsgCrypt), framed over the ``cryptography`` package's AES.

``msg_signature = sha1(sorted(token, timestamp, nonce, encrypt))``; ``key =
b64decode(EncodingAESKey + "=")`` (32 bytes), ``iv = key[:16]``, AES-256-CBC with PKCS#7
padding to 32-byte blocks; plaintext = 16 random bytes + uint32 big-endian length +
message + receive id (the CorpID). AES and the padding come from ``cryptography``; this
module only frames the bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from core.errors import BotdError

# -- callback crypto ---------------------------------------------------------------------------

_BLOCK_BITS = 32 * 8  # WeCom pads to 32-byte blocks, not AES's 16


class WeComCryptoError(BotdError, ValueError):
    """A callback payload that does not decrypt to a well-formed message for this app."""


class WeComCrypto:
    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        try:
            key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("EncodingAESKey is not base64") from None
        if len(key) != 32:
            raise ValueError("EncodingAESKey must decode to 32 bytes (43 characters)")
        self._token = token
        self._key = key
        self._iv = key[:16]
        self.receive_id = receive_id

    def signature(self, timestamp: str, nonce: str, encrypt: str) -> str:
        parts = sorted([self._token, timestamp, nonce, encrypt])
        return hashlib.sha1("".join(parts).encode("utf-8")).hexdigest()

    def check_signature(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> bool:
        expected = self.signature(timestamp, nonce, encrypt)
        return hmac.compare_digest(expected.encode(), msg_signature.strip().lower().encode())

    def decrypt(self, encrypt: str) -> str:
        try:
            data = base64.b64decode(encrypt, validate=True)
        except (binascii.Error, ValueError):
            raise WeComCryptoError("Encrypt is not valid base64") from None
        if not data or len(data) % 16:
            raise WeComCryptoError("ciphertext length is not a multiple of the AES block")
        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        unpadder = padding.PKCS7(_BLOCK_BITS).unpadder()
        try:
            plain = unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise WeComCryptoError("bad padding (wrong key or tampered ciphertext)") from None
        if len(plain) < 20:
            raise WeComCryptoError("plaintext too short")
        (length,) = struct.unpack(">I", plain[16:20])
        if 20 + length > len(plain):
            raise WeComCryptoError("message length runs past the plaintext")
        message, receive_id = plain[20 : 20 + length], plain[20 + length :]
        if not hmac.compare_digest(receive_id, self.receive_id.encode()):
            raise WeComCryptoError("the receive id is not this app's corp id")
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError:
            raise WeComCryptoError("message is not UTF-8") from None

    def encrypt(self, message: str) -> str:
        body = message.encode("utf-8")
        plain = os.urandom(16) + struct.pack(">I", len(body)) + body + self.receive_id.encode()
        padder = padding.PKCS7(_BLOCK_BITS).padder()
        padded = padder.update(plain) + padder.finalize()
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._iv)).encryptor()
        return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()


