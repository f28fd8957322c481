"""Telegram: the connector (python-telegram-bot, imported on first use) and its light config
model, :mod:`connectors.telegram.config` (``[telegram.NAME]``)."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.telegram.connector import TelegramConnector

__all__ = ["TelegramConnector"]
__getattr__ = lazy_exports(__name__, {"TelegramConnector": "connectors.telegram.connector"})
