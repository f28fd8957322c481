"""What WeCom's self-built apps (:mod:`connectors.wecom`) and AI bots (:mod:`connectors.wecom_aibot`)
share: the callback crypto, the callback's checks (signature, freshness) and the form of an
EncodingAESKey in their config. Neither connector imports the other."""
