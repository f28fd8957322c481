"""The HTTP API (OpenAI-compatible ``/v1`` and ``/chat``): the connector (imported on first use)
and its light config model, :mod:`connectors.http_api.config` (``[api]``)."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.http_api.connector import HttpApiConnector

__all__ = ["HttpApiConnector"]
__getattr__ = lazy_exports(__name__, {"HttpApiConnector": "connectors.http_api.connector"})
