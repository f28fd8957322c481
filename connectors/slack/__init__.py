"""Slack: the connector (slack-bolt, imported on first use) and its light config model,
:mod:`connectors.slack.config` (``[slack.NAME]``)."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.slack.connector import SlackConnector

__all__ = ["SlackConnector"]
__getattr__ = lazy_exports(__name__, {"SlackConnector": "connectors.slack.connector"})
