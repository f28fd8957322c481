"""The web console (``[console]``): chat, status, knowledge bases, conversations and audit in a
browser, behind logins with roles. See :mod:`connectors.web_console.connector` (imported on first
use) and its light config model, :mod:`connectors.web_console.config`."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.web_console.connector import WebConsoleConnector

__all__ = ["WebConsoleConnector"]
__getattr__ = lazy_exports(__name__, {"WebConsoleConnector": "connectors.web_console.connector"})
