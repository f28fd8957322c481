"""The config is assembled from the sections the connectors declare (core.config.config_model): a
platform added as one more section class, outside core and outside the other connectors, gets its
[platform.NAME] tables validated and cross-checked like the built-in ones, and its URL paths are
kept from the web console. No daemon."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import Field

from connectors import config_sections
from connectors.sections import AccountSection
from connectors.web_console.config import ConsoleConfig
from core.config import ConfigError, config_from_dict, config_model
from core.secrets import Secret

KEY = "k" * 40


class ChirpConfig(AccountSection):
    """A made-up platform, declared the way connectors/<platform>/config.py declares one."""

    SECTION: ClassVar[str] = "chirp"
    ROUTES: ClassVar[tuple[str, ...]] = ("/chirp",)
    doc_zh: ClassVar[str] = "一个虚构的平台。"

    token: Secret = Field(description="The token.", json_schema_extra={"zh": "令牌。"})
    routes: dict[str, str] = Field(default_factory=dict, description="Routes.", json_schema_extra={"zh": "路由。"})


MODEL = config_model([*config_sections(), ChirpConfig])


def load(data: dict, tmp_path):
    return config_from_dict(data, tmp_path / "config.toml", model=MODEL, check_files=False)


def test_a_new_platform_section_is_validated_and_read_typed(tmp_path):
    cfg = load({"chirp": {"assistant": {"token": "env:CHIRP_TOKEN"}}}, tmp_path)
    assert ChirpConfig.sections(cfg)["assistant"].token == "env:CHIRP_TOKEN"
    with pytest.raises(ConfigError, match=r"chirp\.assistant\.tokn: unknown key"):
        load({"chirp": {"assistant": {"token": "env:CHIRP_TOKEN", "tokn": "x"}}}, tmp_path)
    # The account checks every platform shares: a section names a bot, and so do its routes.
    with pytest.raises(ConfigError, match=r"chirp\.nobody: names no bot"):
        load({"chirp": {"nobody": {"token": "env:CHIRP_TOKEN"}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"chirp\.assistant\.routes\.c1: names no bot 'ghost'"):
        load({"chirp": {"assistant": {"token": "env:CHIRP_TOKEN", "routes": {"c1": "ghost"}}}}, tmp_path)
    # A token written in the file itself is refused without being repeated.
    with pytest.raises(ConfigError) as exc:
        load({"chirp": {"assistant": {"token": "s3cr3t-token-value"}}}, tmp_path)
    assert "s3cr3t" not in str(exc.value)


# Every path a section declares (the built-in platforms', the API's) and the made-up one's.
PATHS = sorted({"/chirp", "/chirp/admin", *(p for s in config_sections() for p in s.ROUTES)})


@pytest.mark.parametrize("path", PATHS)
def test_the_console_is_never_served_under_a_platforms_path(tmp_path, path):
    console = {"enabled": True, "path": path, "signing_key": "env:BOTD_T_KEY",
               "users": {"root": {"password_hash": "$argon2id$v=19$m=65536,t=3,p=4$x$y", "role": "admin"}}}
    with pytest.raises(ConfigError, match=r"console\.path: .*used by"):
        load({"console": console}, tmp_path)
    assert ConsoleConfig.of(load({"console": {**console, "path": "/admin"}}, tmp_path)).path == "/admin"
