"""The whole config model: core's sections (:class:`core.config.Config`) and those declared above
core, assembled from the connectors' registry. The daemon, the CLI and the tests load config.toml
with :func:`load_config` here; :func:`core.config.load_config` alone knows core's sections only."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from connectors import config_sections
from core import config as core_config
from core.config import Config, ConfigError, config_model

__all__ = ["CONFIG_MODEL", "Config", "ConfigError", "config_from_dict", "load_config"]

# core's Config with [api], [wecom.NAME], [wecom_aibot.NAME], [telegram.NAME], [slack.NAME],
# [console] and [notify].
CONFIG_MODEL: type[Config] = config_model(config_sections())


def load_config(path: Path | str | None = None, *, check_files: bool = True,
                check_secrets: bool | Collection[str] = True) -> Config:
    """:func:`core.config.load_config` with every section (see there)."""
    return core_config.load_config(path, model=CONFIG_MODEL, check_files=check_files, check_secrets=check_secrets)


def config_from_dict(data: dict[str, Any], path: Path | str, *, check_files: bool = True,
                     check_secrets: bool | Collection[str] = True) -> Config:
    """:func:`core.config.config_from_dict` with every section (see there)."""
    return core_config.config_from_dict(data, path, model=CONFIG_MODEL, check_files=check_files,
                                        check_secrets=check_secrets)
