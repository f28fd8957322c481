"""The edges: one module per platform. Each verifies, parses and normalises its events,
hands them to the dispatcher it was given, and streams replies back.

Connectors are found by name here, so a new platform is one new module plus an entry
in :data:`REGISTRY` and its config section. A connector imports only ``core``.
"""

from __future__ import annotations

import importlib

from connectors.base import Connector

# name -> "module:Class"
REGISTRY: dict[str, str] = {
    "http_api": "connectors.http_api:HttpApiConnector",
    "wecom": "connectors.wecom:WeComConnector",
    "telegram": "connectors.telegram:TelegramConnector",
    "slack": "connectors.slack:SlackConnector",
}


def load_connector(name: str) -> type[Connector]:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise LookupError(f"no connector named {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
