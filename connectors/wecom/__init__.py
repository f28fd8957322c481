"""WeCom (企业微信) self-built apps: the server API client and the connector (imported on first use),
and their light config model, :mod:`connectors.wecom.config` (``[wecom.NAME]``). The callback
crypto is shared with the AI bot: :mod:`connectors.wecom_common`."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.wecom.api import ERRCODES, WeComApi, WeComApiError, errcode_meaning
    from connectors.wecom.connector import WeComConnector, WeComReply
    from connectors.wecom_common.crypto import WeComCrypto, WeComCryptoError

__all__ = ["ERRCODES", "WeComApi", "WeComApiError", "WeComConnector", "WeComCrypto", "WeComCryptoError",
           "WeComReply", "errcode_meaning"]
__getattr__ = lazy_exports(__name__, {
    "ERRCODES": "connectors.wecom.api", "WeComApi": "connectors.wecom.api", "WeComApiError": "connectors.wecom.api",
    "errcode_meaning": "connectors.wecom.api", "WeComConnector": "connectors.wecom.connector",
    "WeComReply": "connectors.wecom.connector", "WeComCrypto": "connectors.wecom_common.crypto",
    "WeComCryptoError": "connectors.wecom_common.crypto",
})
