"""The one root of botd's own errors.

Every error botd raises on purpose derives from :class:`BotdError`, so a caller that
must never crash (a connector's handler, the daemon's loop) can tell "botd refused or
failed this, for a reason it states" from a bug. The platform and library errors
botd catches are mapped to these at the edge where they happen.
"""

from __future__ import annotations


class BotdError(Exception):
    """Something botd refused or could not do; the message says what, for a person."""
