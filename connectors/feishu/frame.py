"""The frames of Feishu's long connection: protobuf ``pbbp2.Frame`` (proto2), encoded and decoded here.

The message (lark-oapi 1.7.5 ``lark_oapi/ws/pb/pbbp2_pb2.py``; docs/protocols/feishu.md)::

    message Header { required string key = 1; required string value = 2; }
    message Frame {
      required uint64 SeqID = 1;  required uint64 LogID = 2;
      required int32 service = 3; required int32 method = 4;   // 0 CONTROL, 1 DATA
      repeated Header headers = 5;
      optional string payload_encoding = 6; optional string payload_type = 7;
      optional bytes payload = 8; optional string LogIDNew = 9;
    }

A hand-written codec for this one message (varints and length-delimited fields): the SDK's
generated module imports the whole SDK (about 2.7 s, and its WebSocket module grabs an event
loop at import). The tests check this codec against the SDK's generated class, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTROL, DATA = 0, 1
_MASK64 = (1 << 64) - 1


class FrameError(ValueError):
    """The bytes are not a well-formed frame."""


@dataclass
class Frame:
    seq_id: int = 0
    log_id: int = 0
    service: int = 0
    method: int = CONTROL
    headers: list[tuple[str, str]] = field(default_factory=list)
    payload_encoding: str | None = None
    payload_type: str | None = None
    payload: bytes | None = None
    log_id_new: str | None = None

    def header(self, key: str) -> str | None:
        return next((v for k, v in self.headers if k == key), None)

    def encode(self) -> bytes:
        out = bytearray()
        _varint_field(out, 1, self.seq_id)
        _varint_field(out, 2, self.log_id)
        _varint_field(out, 3, self.service)
        _varint_field(out, 4, self.method)
        for key, value in self.headers:
            inner = bytearray()
            _bytes_field(inner, 1, key.encode())
            _bytes_field(inner, 2, value.encode())
            _bytes_field(out, 5, bytes(inner))
        for number, text in ((6, self.payload_encoding), (7, self.payload_type)):
            if text is not None:
                _bytes_field(out, number, text.encode())
        if self.payload is not None:
            _bytes_field(out, 8, self.payload)
        if self.log_id_new is not None:
            _bytes_field(out, 9, self.log_id_new.encode())
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Frame:
        frame = cls()
        seen: set[int] = set()
        for number, value in _fields(data):
            seen.add(number)
            if number in (1, 2, 3, 4):
                if not isinstance(value, int):
                    raise FrameError(f"field {number} is not a varint")
                if number == 1:
                    frame.seq_id = value
                elif number == 2:
                    frame.log_id = value
                else:
                    value = _int32(value)
                    if number == 3:
                        frame.service = value
                    else:
                        frame.method = value
            elif number == 5:
                frame.headers.append(_header(_as_bytes(value, number)))
            elif number == 6:
                frame.payload_encoding = _text(value, number)
            elif number == 7:
                frame.payload_type = _text(value, number)
            elif number == 8:
                frame.payload = _as_bytes(value, number)
            elif number == 9:
                frame.log_id_new = _text(value, number)
        if not {1, 2, 3, 4} <= seen:
            raise FrameError("a required field (SeqID, LogID, service, method) is missing")
        return frame


def _varint(out: bytearray, n: int) -> None:
    n &= _MASK64  # negative int32s are sign-extended to ten bytes, as protobuf does
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _varint_field(out: bytearray, number: int, n: int) -> None:
    _varint(out, number << 3)
    _varint(out, n)


def _bytes_field(out: bytearray, number: int, data: bytes) -> None:
    _varint(out, (number << 3) | 2)
    _varint(out, len(data))
    out += data


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise FrameError("truncated varint")
        byte = data[i]
        i += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n & _MASK64, i
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(data):
        tag, i = _read_varint(data, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            out.append((number, value))
        elif wire == 2:
            size, i = _read_varint(data, i)
            if i + size > len(data):
                raise FrameError("truncated field")
            out.append((number, data[i:i + size]))
            i += size
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise FrameError(f"unsupported wire type {wire}")
        if i > len(data):
            raise FrameError("truncated field")
    return out


def _int32(n: int) -> int:
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n & 0x80000000 else n


def _as_bytes(value: int | bytes, number: int) -> bytes:
    if not isinstance(value, bytes):
        raise FrameError(f"field {number} is not length-delimited")
    return value


def _text(value: int | bytes, number: int) -> str:
    try:
        return _as_bytes(value, number).decode()
    except UnicodeDecodeError:
        raise FrameError(f"field {number} is not UTF-8") from None


def _header(data: bytes) -> tuple[str, str]:
    key = value = None
    for number, v in _fields(data):
        if number == 1:
            key = _text(v, 1)
        elif number == 2:
            value = _text(v, 2)
    if key is None or value is None:
        raise FrameError("a header without key or value")
    return key, value
