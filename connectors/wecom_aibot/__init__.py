"""WeCom AI bot (企业微信智能机器人): the long connection, callback mode and streamed answers
(imported on first use), and the light config model, :mod:`connectors.wecom_aibot.config`
(``[wecom_aibot.NAME]``)."""

from typing import TYPE_CHECKING

from connectors.lazy import lazy_exports

if TYPE_CHECKING:
    from connectors.wecom_aibot.connector import WecomAibotConnector, stream_id_of
    from connectors.wecom_aibot.reply import STREAM_BYTES, AibotReply, Slots
    from connectors.wecom_aibot.ws import AibotError, AibotLink

__all__ = ["STREAM_BYTES", "AibotError", "AibotLink", "AibotReply", "Slots", "WecomAibotConnector", "stream_id_of"]
__getattr__ = lazy_exports(__name__, {
    "WecomAibotConnector": "connectors.wecom_aibot.connector", "stream_id_of": "connectors.wecom_aibot.connector",
    "STREAM_BYTES": "connectors.wecom_aibot.reply", "AibotReply": "connectors.wecom_aibot.reply",
    "Slots": "connectors.wecom_aibot.reply", "AibotError": "connectors.wecom_aibot.ws",
    "AibotLink": "connectors.wecom_aibot.ws",
})
