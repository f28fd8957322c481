"""The web console (``[console]``): chat, status, knowledge bases, conversations and audit in a
browser, behind logins with roles. See :mod:`connectors.web_console.connector`."""

from connectors.web_console.connector import WebConsoleConnector

__all__ = ["WebConsoleConnector"]
