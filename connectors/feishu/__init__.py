"""Feishu / Lark (飞书): the connector (long connection and event callbacks, CardKit streaming,
patched cards or plain replies) and its light config model, :mod:`connectors.feishu.config`
(``[feishu.NAME]``)."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.feishu.connector import FeishuConnector

__all__ = ["FeishuConnector"]
__getattr__ = lazy_exports(__name__, {"FeishuConnector": "connectors.feishu.connector"})
