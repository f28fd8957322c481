"""WeCom AI bot (企业微信智能机器人): the long connection, callback mode and streamed answers."""

from connectors.wecom_aibot.connector import WecomAibotConnector, stream_id_of
from connectors.wecom_aibot.reply import STREAM_BYTES, AibotReply, Slots
from connectors.wecom_aibot.ws import AibotError, AibotLink

__all__ = ["STREAM_BYTES", "AibotError", "AibotLink", "AibotReply", "Slots", "WecomAibotConnector", "stream_id_of"]
