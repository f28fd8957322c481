"""Secret references in config.toml and how they are resolved.

A secret is never written inline in config.toml: the file names where it lives.

- ``env:NAME``   the environment variable NAME
- ``file:PATH``  the first line of the file PATH (e.g. ``/etc/botd/api-key``)
- ``cred:NAME``  a systemd credential: ``$CREDENTIALS_DIRECTORY/NAME`` (LoadCredential=)

Resolved values never appear in error messages; only the reference does. Every value
resolved here is also remembered, so that the log (core.logging) shows ``***`` in its
place wherever it turns up: in a field, an exception's text or another library's line.
Config fields holding a reference have the type :data:`Secret`, marked so that code can
find them by type (:func:`is_secret_type`) and never show what was written in them.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin
from urllib.parse import quote, quote_plus

from pydantic import AfterValidator

from core.errors import BotdError

_REF = re.compile(r"^(env|file|cred):(.+)$")

# Shorter values are not masked in the log: "***" in place of every "admin" or "1234"
# would garble the log and protect nothing.
MIN_MASKED_CHARS = 6


class SecretError(BotdError, ValueError):
    """A secret reference that cannot be resolved; the message never holds the secret."""


class _SecretMark:
    """Annotated metadata that marks a config field as a secret reference."""

    def __repr__(self) -> str:
        return "Secret"


SECRET_MARK = _SecretMark()


def _check_reference(value: str) -> str:
    m = _REF.match(value)
    if not m:
        raise ValueError(
            "secrets are not written inline; use \"env:VARIABLE\", \"file:/path/to/file\" "
            "or \"cred:NAME\" (systemd LoadCredential)"
        )
    kind, rest = m.groups()
    # What follows "env:" may be a pasted secret, so it is not repeated here.
    if kind in ("env", "cred") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", rest):
        what = "an environment variable's" if kind == "env" else "a credential's"
        raise ValueError(f"{kind}: needs {what} name (letters, digits, '_', '.', '-'), not the secret itself")
    return value


Secret = Annotated[str, SECRET_MARK, AfterValidator(_check_reference)]


@dataclass(frozen=True, slots=True)
class SecretForm:
    """A platform's rule for a secret's value, beside the field it belongs to:
    ``Annotated[Secret, SecretForm(check)]``; ``check`` returns what is wrong, or ""."""

    check: Callable[[str], str]


def secret_form(tp: Any) -> SecretForm | None:
    """The :class:`SecretForm` a field's type carries (also inside ``... | None``), if any."""
    if get_origin(tp) is Annotated:
        found = next((m for m in tp.__metadata__ if isinstance(m, SecretForm)), None)
        return found or secret_form(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType, list, tuple):
        return next((f for f in map(secret_form, get_args(tp)) if f is not None), None)
    return None


def is_secret_type(tp: Any) -> bool:
    """Whether a type is :data:`Secret` or holds one (``Secret | None``, ``list[Secret]``).

    Models are not looked into: a section holding a secret is not itself one.
    """
    if get_origin(tp) is Annotated:
        return any(m is SECRET_MARK for m in tp.__metadata__) or is_secret_type(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType, list, tuple, set, frozenset, dict):
        return any(is_secret_type(a) for a in get_args(tp))
    return False


# The values resolved so far (and their URL-encoded forms), replaced as a whole whenever one
# is added, so that the logger reads a consistent set without a lock.
_known: tuple[int, frozenset[str]] = (0, frozenset())
_known_lock = threading.Lock()


def remember_secret(value: str) -> None:
    """Have the log mask ``value`` from now on (for a resolved secret or a fetched access token)."""
    global _known
    forms = {f for f in (value, quote(value, safe=""), quote_plus(value, safe="")) if len(f) >= MIN_MASKED_CHARS}
    with _known_lock:
        generation, values = _known
        if not forms <= values:
            _known = (generation + 1, values | forms)


def known_secrets() -> tuple[int, frozenset[str]]:
    """The secret values to mask, and a number that changes whenever they change."""
    return _known


def resolve_secret(ref: str) -> str:
    """Return the secret a reference points at, or raise :class:`SecretError`."""
    value = _read(ref)
    remember_secret(value)
    return value


def _read(ref: str) -> str:
    m = _REF.match(ref)
    if not m:
        raise SecretError("not a secret reference")
    kind, rest = m.groups()
    if kind == "env":
        value = os.environ.get(rest)
        if value is None or not value.strip():
            raise SecretError(f"environment variable {rest} is not set (referenced as {ref!r})")
        return value.strip()
    if kind == "cred":
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise SecretError(f"{ref!r}: CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
        path = Path(folder) / rest
    else:
        path = Path(rest).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretError(f"secret file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise SecretError(f"secret file {str(path)!r} cannot be read: {exc.strerror}") from None
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise SecretError(f"secret file {str(path)!r} is empty")
    return lines[0].strip()


def secrets_digest(refs: Iterable[str]) -> str:
    """A digest of the values the references resolve to now (an unresolvable one: its error).

    A reload compares these, not the references: a key replaced inside the file that
    ``file:/etc/botd/api-key`` names changes nothing in config.toml, but must take effect.
    """
    h = hashlib.sha256()
    for ref in refs:
        try:
            value = "=" + resolve_secret(ref)
        except SecretError as exc:
            value = "!" + str(exc)
        h.update(ref.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()
