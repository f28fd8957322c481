"""The edges: one package per platform. Each verifies, parses and normalises its events, hands
them up with a reply target, and knows nothing of models, prompts or Redis keys.

Connectors are found by name here: a new platform is one new package, ``connectors/<platform>/``,
with its connector and its light config model (``config.py``: pydantic and core only), and one
entry in :data:`REGISTRY`. Core's config knows no platform: the config model is assembled from
the sections named here (:mod:`connectors.config`). Only the connectors a config enables are
imported; every config model is. A connector imports only ``core`` and the plumbing beside it in
``connectors/``, never another connector.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from connectors.dingtalk.config import DingtalkConfig
from connectors.feishu.config import FeishuConfig
from connectors.http_api.config import ApiConfig
from connectors.notify.config import NotifyConfig
from connectors.slack.config import SlackConfig
from connectors.telegram.config import TelegramConfig
from connectors.web_console.config import ConsoleConfig
from connectors.wecom.config import WecomConfig
from connectors.wecom_aibot.config import WecomAibotConfig
from core.config import Config, PluggedSection

if TYPE_CHECKING:
    from connectors.base import Edge


@dataclass(frozen=True, slots=True)
class Entry:
    target: str  # "module:Class"
    # Its config section's model: a reload that changes the section replaces the connector.
    config: type[PluggedSection]
    enabled: Callable[[Config], bool]  # whether a config asks for it

    @property
    def section(self) -> str:
        """The config section it reads (``[telegram.NAME]`` -> "telegram")."""
        return self.config.SECTION


REGISTRY: dict[str, Entry] = {
    "http_api": Entry("connectors.http_api.connector:HttpApiConnector", ApiConfig, lambda c: ApiConfig.of(c).enabled),
    "wecom": Entry("connectors.wecom.connector:WeComConnector", WecomConfig, lambda c: bool(WecomConfig.sections(c))),
    "wecom_aibot": Entry("connectors.wecom_aibot.connector:WecomAibotConnector", WecomAibotConfig,
                         lambda c: any(b.enabled for b in WecomAibotConfig.sections(c).values())),
    "telegram": Entry("connectors.telegram.connector:TelegramConnector", TelegramConfig,
                      lambda c: bool(TelegramConfig.sections(c))),
    "slack": Entry("connectors.slack.connector:SlackConnector", SlackConfig, lambda c: bool(SlackConfig.sections(c))),
    "dingtalk": Entry("connectors.dingtalk.connector:DingtalkConnector", DingtalkConfig,
                      lambda c: any(b.enabled for b in DingtalkConfig.sections(c).values())),
    "feishu": Entry("connectors.feishu.connector:FeishuConnector", FeishuConfig,
                    lambda c: any(b.enabled for b in FeishuConfig.sections(c).values())),
    "web_console": Entry("connectors.web_console.connector:WebConsoleConnector", ConsoleConfig,
                         lambda c: ConsoleConfig.of(c).enabled),
}

# Sections no connector above reads: the admin alerts to a WeCom group robot (connectors.notify).
OTHER_SECTIONS: tuple[type[PluggedSection], ...] = (NotifyConfig,)


def config_sections() -> list[type[PluggedSection]]:
    """Every section declared above core, in the order the config model lists them."""
    return [*(entry.config for entry in REGISTRY.values()), *OTHER_SECTIONS]


def configured(config: Config) -> list[str]:
    """The names of the connectors ``config`` enables, in start order."""
    return [name for name, entry in REGISTRY.items() if entry.enabled(config)]


def load_connector(name: str) -> type[Edge]:
    try:
        target = REGISTRY[name].target
    except KeyError:
        raise LookupError(f"no connector named {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
