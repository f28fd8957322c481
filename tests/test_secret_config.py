"""Secrets in config.toml: an inline value is refused without being repeated, and commands
that use no secret (``botd kb ingest``) run where the bots' secrets are not set."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from connectors.config import load_config
from core.config import ConfigError
from tests.helpers import BOTD

# Each pasted where a secret reference belongs.
INLINE = {
    "api.keys.0": "sk-Q7xZ9vLq2WmT4pR8nB",
    "redis.password": "Rp-h4Jk8Lm2Nq6Tz",
    "telegram.assistant.token": "7311598826:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
    "slack.assistant.bot_token": "xoxb-20411-88213-Vb7Yq2Lw9Kd3Pz",
    "wecom.assistant.secret": "Wc-Gh5Tr8Yu1Io4Pa7Sd",
}


def _toml(values: dict[str, str]) -> str:
    return f"""
[api]
keys = ["{values['api.keys.0']}"]
[redis]
url = "redis://127.0.0.1:6379/0"
password = "{values['redis.password']}"
[telegram.assistant]
token = "{values['telegram.assistant.token']}"
[slack.assistant]
bot_token = "{values['slack.assistant.bot_token']}"
signing_secret = "env:SLACK_SIGNING_SECRET"
[wecom.assistant]
corp_id = "ww1436e0e65a779aee"
agent_id = 1000002
token = "env:WECOM_TOKEN"
encoding_aes_key = "env:WECOM_AES_KEY"
secret = "{values['wecom.assistant.secret']}"
"""


def _refs() -> dict[str, str]:
    return {"api.keys.0": "env:BOTD_API_KEY", "redis.password": "env:REDIS_PASSWORD",
            "telegram.assistant.token": "env:TG_TOKEN", "slack.assistant.bot_token": "env:SLACK_BOT_TOKEN",
            "wecom.assistant.secret": "env:WECOM_SECRET"}


def _shows_part_of(message: str, value: str) -> bool:
    """Whether any 5 consecutive characters of ``value`` appear in ``message``."""
    return any(value[i:i + 5] in message for i in range(len(value) - 4))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("key", list(INLINE))
def test_an_inline_secret_is_refused_without_being_repeated(tmp_path, key):
    path = _write(tmp_path, _toml({**_refs(), key: INLINE[key]}))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {key}: secrets are not written inline"), msg
    assert not _shows_part_of(msg, INLINE[key]), msg


@pytest.mark.parametrize("text, key, value", [
    # a secret pasted after "env:" instead of a variable's name
    ('[telegram.assistant]\ntoken = "env:7311598826:AAHdqTcvCH1vGWJxfSeof"\n', "telegram.assistant.token",
     "7311598826:AAHdqTcvCH1vGWJxfSeof"),
    ('[api]\nkeys = ["cred:sk Q7xZ9vLq2WmT4pR8"]\n', "api.keys.0", "sk Q7xZ9vLq2WmT4pR8"),
    # the wrong type in a secret field: still not repeated
    ("[redis]\npassword = 918273645501\n", "redis.password", "918273645501"),
    ("[api]\nkeys = [918273645501]\n", "api.keys.0", "918273645501"),
])
def test_a_malformed_reference_is_refused_without_being_repeated(tmp_path, text, key, value):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert not _shows_part_of(msg, value), msg


def test_other_fields_still_show_what_was_written(tmp_path):
    """Only secret fields are kept quiet: elsewhere the wrong value helps the admin."""
    with pytest.raises(ConfigError, match=r"server\.port: .*\(got 'eighty'\)"):
        load_config(_write(tmp_path, '[server]\nport = "eighty"\n'))


def test_check_config_names_every_inline_secret_and_repeats_none(tmp_path):
    path = _write(tmp_path, _toml(INLINE))
    res = subprocess.run([BOTD, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith(f"botd: config error: {path}: ") and res.stderr.count("\n") == 1, res.stderr
    for key, value in INLINE.items():
        assert f"{key}: secrets are not written inline" in res.stderr, res.stderr
        assert not _shows_part_of(res.stderr + res.stdout, value), res.stderr


def test_check_secrets_resolves_only_what_it_is_asked_to(tmp_path, monkeypatch):
    monkeypatch.delenv("BOTD_TEST_UNSET_TG", raising=False)
    monkeypatch.setenv("BOTD_TEST_REDIS_PW", "redis-pw-value")
    path = _write(tmp_path, '[redis]\nurl = "redis://127.0.0.1:6379/0"\npassword = "env:BOTD_TEST_REDIS_PW"\n'
                            '[telegram.assistant]\ntoken = "env:BOTD_TEST_UNSET_TG"\n')
    with pytest.raises(ConfigError, match=r"telegram\.assistant\.token: environment variable BOTD_TEST_UNSET_TG"):
        load_config(path)
    assert load_config(path, check_secrets=False).telegram["assistant"].token == "env:BOTD_TEST_UNSET_TG"
    assert load_config(path, check_secrets=["redis"]).redis.password == "env:BOTD_TEST_REDIS_PW"
    with pytest.raises(ConfigError, match=r"telegram\.assistant\.token"):
        load_config(path, check_secrets=["telegram.assistant"])
    # the form is checked even when the values are not
    bad = _write(tmp_path, '[telegram.assistant]\ntoken = "7311598826:AAHdqTcvCH1vGWJxfSeof"\n')
    with pytest.raises(ConfigError, match=r"telegram\.assistant\.token: secrets are not written inline"):
        load_config(bad, check_secrets=False)


def test_kb_ingest_needs_no_bot_secret_but_check_config_does(tmp_path):
    """`sudo -u botd botd kb ingest` on a deployment where the tokens reach only the service."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text("# Leave\n\nEvery employee has 25 days of paid leave a year.\n")
    path = _write(tmp_path, f"""
[server]
state_dir = "{tmp_path / 'state'}"
[api]
keys = ["cred:api-key"]
[knowledge.hr]
paths = ["{docs}"]
[bots.assistant]
knowledge = ["hr"]
[telegram.assistant]
token = "env:BOTD_TEST_UNSET_TG"
""")
    env = {k: v for k, v in os.environ.items() if k not in ("BOTD_TEST_UNSET_TG", "CREDENTIALS_DIRECTORY")}
    ingest = subprocess.run([BOTD, "kb", "ingest", "--config", str(path)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert ingest.returncode == 0, ingest.stderr
    assert "hr" in ingest.stdout, ingest.stdout
    assert (tmp_path / "state").is_dir()
    check = subprocess.run([BOTD, "check-config", "--config", str(path)], capture_output=True, text=True,
                           timeout=60, env=env)
    assert check.returncode == 1
    # every unusable secret is named, in one line
    assert check.stderr.count("\n") == 1, check.stderr
    assert "api.keys[0]: 'cred:api-key': CREDENTIALS_DIRECTORY is not set" in check.stderr, check.stderr
    assert "telegram.assistant.token: environment variable BOTD_TEST_UNSET_TG is not set" in check.stderr
