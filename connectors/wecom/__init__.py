"""WeCom (企业微信): the callback crypto, the server API client and the connector."""

from connectors.wecom.api import ERRCODES, WeComApi, WeComApiError, errcode_meaning
from connectors.wecom.connector import WeComConnector, WeComReply
from connectors.wecom.crypto import WeComCrypto, WeComCryptoError

__all__ = ["ERRCODES", "WeComApi", "WeComApiError", "WeComConnector", "WeComCrypto", "WeComCryptoError",
           "WeComReply", "errcode_meaning"]
