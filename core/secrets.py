"""Secret references in config.toml and how they are resolved.

A secret is never written inline in config.toml: the file names where it lives.

- ``env:NAME``   the environment variable NAME
- ``file:PATH``  the first line of the file PATH (e.g. ``/etc/botd/api-key``)
- ``cred:NAME``  a systemd credential: ``$CREDENTIALS_DIRECTORY/NAME`` (LoadCredential=)

Resolved values never appear in error messages; only the reference does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

_REF = re.compile(r"^(env|file|cred):(.+)$")


class SecretError(ValueError):
    """A secret reference that cannot be resolved; the message never holds the secret."""


def _check_reference(value: str) -> str:
    m = _REF.match(value)
    if not m:
        raise ValueError(
            "secrets are not written inline; use \"env:VARIABLE\", \"file:/path/to/file\" "
            "or \"cred:NAME\" (systemd LoadCredential)"
        )
    kind, rest = m.groups()
    if kind in ("env", "cred") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", rest):
        raise ValueError(f"{kind}: needs a plain name, got {rest!r}")
    return value


Secret = Annotated[str, AfterValidator(_check_reference)]


def resolve_secret(ref: str) -> str:
    """Return the secret a reference points at, or raise :class:`SecretError`."""
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
