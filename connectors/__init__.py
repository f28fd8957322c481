"""The edges: one module (or package) per platform. Each verifies, parses and normalises its
events, hands them up with a reply target, and knows nothing of models, prompts or Redis keys.

Connectors are found by name here: a new platform is one new module, an entry in
:data:`REGISTRY` and its config section. Only the connectors a config enables are imported.
A connector imports only ``core`` and the plumbing beside it in ``connectors/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connectors.base import Edge


@dataclass(frozen=True, slots=True)
class Entry:
    target: str  # "module:Class"
    section: str  # the config section it reads: a reload that changes it replaces the connector
    enabled: Callable[[Any], bool]  # whether a config asks for it


REGISTRY: dict[str, Entry] = {
    "http_api": Entry("connectors.http_api:HttpApiConnector", "api", lambda c: c.api.enabled),
    "wecom": Entry("connectors.wecom:WeComConnector", "wecom", lambda c: bool(c.wecom)),
    "wecom_aibot": Entry("connectors.wecom_aibot:WecomAibotConnector", "wecom_aibot",
                         lambda c: any(b.enabled for b in c.wecom_aibot.values())),
    "telegram": Entry("connectors.telegram:TelegramConnector", "telegram", lambda c: bool(c.telegram)),
    "slack": Entry("connectors.slack:SlackConnector", "slack", lambda c: bool(c.slack)),
    "web_console": Entry("connectors.web_console:WebConsoleConnector", "console", lambda c: c.console.enabled),
}


def configured(config: Any) -> list[str]:
    """The names of the connectors ``config`` enables, in start order."""
    return [name for name, entry in REGISTRY.items() if entry.enabled(config)]


def load_connector(name: str) -> type[Edge]:
    try:
        target = REGISTRY[name].target
    except KeyError:
        raise LookupError(f"no connector named {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
