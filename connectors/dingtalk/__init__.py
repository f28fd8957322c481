"""DingTalk (钉钉): the connector (Stream mode and HTTP callbacks, AI card or markdown replies) and
its light config model, :mod:`connectors.dingtalk.config` (``[dingtalk.NAME]``)."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.dingtalk.connector import DingtalkConnector

__all__ = ["DingtalkConnector"]
__getattr__ = lazy_exports(__name__, {"DingtalkConnector": "connectors.dingtalk.connector"})
