"""systemd's notify protocol: READY=1, WATCHDOG=1, STOPPING=1 to $NOTIFY_SOCKET.

The protocol is one datagram of "KEY=value" lines to a unix socket (an abstract one
when the path starts with "@"); python-systemd would need libsystemd's headers to
install, so these few lines stand in for it. Without NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; False when not run under systemd or on error."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec= when systemd asked this process for pings, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 1_000_000 / 2)
    except ValueError:
        return None
