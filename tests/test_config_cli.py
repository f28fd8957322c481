"""config.toml validation and the botd command, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from connectors.config import load_config
from core.config import ConfigError
from tests.helpers import BOTD, REPO, free_port


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_shipped_config_is_valid_and_uses_embedded_defaults():
    cfg = load_config(REPO / "config.toml")
    assert cfg.redis.url == ""
    assert cfg.model.path == ""
    assert cfg.model.resolved_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)


def test_every_key_of_the_shipped_config_has_a_comment():
    lines = (REPO / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("[") and "=" in s:
            assert lines[i - 1].strip().startswith("#"), f"no comment above: {s}"


@pytest.mark.parametrize("text, expected", [
    ("[model]\nn_ctxx = 10\n", "model.n_ctxx: unknown key"),
    ("[server]\nport = \"eighty\"\n", "server.port"),
    ("[server]\nport = 70000\n", "server.port"),
    ("[model]\npath = \"/nope/model.gguf\"\n", "model.path: no such file '/nope/model.gguf'"),
    ("[redis]\nurl = \"http://x\"\n", "redis.url"),
    ("[api]\nkeys = [\"plain-secret\"]\n", "api.keys.0: secrets are not written inline"),
    ("[api]\nkeys = [\"env:BOTD_TEST_UNSET_VAR\"]\n", "api.keys[0]: environment variable BOTD_TEST_UNSET_VAR"),
    ("[server]\nhost = \"0.0.0.0\"\n", "api.keys: server.host is '0.0.0.0' (not loopback)"),
    ("[api]\ndefault_bot = \"ghost\"\n", "api.default_bot: names no bot"),
    ("[model]\nmax_tokens = 5000\nn_ctx = 4096\n", "max_tokens must be smaller than n_ctx"),
    ("this is not toml", "not valid TOML"),
    ("[bogus]\n", "bogus: unknown key"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(str(path)), msg
    assert expected in msg, msg
    assert "\n" not in msg


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        load_config(write(tmp_path, f'[model]\npath = "{fake}"\n'))


def test_check_config_exit_codes_and_one_line(tmp_path):
    ok = subprocess.run([BOTD, "check-config", "--config", str(REPO / "config.toml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = write(tmp_path, "[model]\nn_ctxx = 1\n")
    res = subprocess.run([BOTD, "check-config", "--config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "model.n_ctxx" in res.stderr and str(bad) in res.stderr
    missing = subprocess.run([BOTD, "check-config", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "file not found" in missing.stderr


def test_run_refuses_a_bad_config_without_traceback(tmp_path):
    bad = write(tmp_path, "[server]\nhost = \"0.0.0.0\"\n")
    res = subprocess.run([BOTD, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "api.keys" in res.stderr


def test_secret_values_never_reach_the_log(tmp_path):
    """A daemon run with a key and a redis password logs neither."""
    port = free_port()
    cfg = write(tmp_path, f"""
[server]
port = {port}
state_dir = "{tmp_path / 'state'}"
log_format = "json"
[api]
keys = ["env:BOTD_TEST_KEY"]
""")
    env = {**os.environ, "BOTD_TEST_KEY": "sk-very-secret-value"}
    proc = subprocess.Popen([BOTD, "run", "--config", str(cfg)], stderr=subprocess.PIPE, env=env, text=True)
    try:
        _wait_health(port)
        for auth, expected in (("Bearer sk-very-secret-value", 200), ("Bearer sk-wrong-guess", 401)):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode(),
                headers={"Authorization": auth, "Content-Type": "application/json"},
            )
            try:
                status = urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                status = e.code
            assert status == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "sk-very-secret-value" not in err
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    answered = [x for x in lines if x.get("event") == "answered"]
    assert answered, repr(err[-3000:])
    assert answered and all(x["request_id"] for x in answered)
    assert {"latency_ms", "tokens_in", "tokens_out", "queue_wait_ms"} <= set(answered[0])


def _wait_health(port: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_run_on_embedded_defaults_answers_and_stops_cleanly(tmp_path):
    """`botd run` as a process: embedded model and embedded Redis, real HTTP, SIGTERM -> exit 0."""
    port = free_port()
    cfg = (REPO / "config.toml").read_text().replace("port = 8080", f"port = {port}").replace(
        'state_dir = "state"', f'state_dir = "{tmp_path / "state"}"')
    path = write(tmp_path, cfg)
    proc = subprocess.Popen([BOTD, "run", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        health = _wait_health(port)
        assert health == {"status": "ok"}  # model loaded, Redis up; no details without a key (the default)
        for text in ("Hello, who are you?", "Tell me more."):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 16,
                                 "conversation_id": "e2e"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            data = json.loads(urllib.request.urlopen(req, timeout=60).read())
            assert data["choices"][0]["message"]["content"].strip()
        conv = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/conversations/e2e").read())
        assert len(conv["messages"]) == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err


def test_console_chat(tmp_path):
    cfg = (REPO / "config.toml").read_text().replace(
        'state_dir = "state"', f'state_dir = "{tmp_path / "state"}"').replace("max_tokens = 512", "max_tokens = 16")
    path = write(tmp_path, cfg)
    res = subprocess.run([BOTD, "chat", "--config", str(path)], input="Hello there\n/reset\n/quit\n",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "assistant> " in out
    reply = out.split("assistant> ")[1].split("you>")[0].strip()
    assert reply and "forgotten" not in reply
    assert "I have forgotten this conversation" in out


def test_every_config_key_is_documented_in_the_readme_and_the_shipped_config():
    """The README's configuration reference and config.toml's comments cover every key."""
    import re

    from pydantic import BaseModel

    from connectors.config import CONFIG_MODEL as Config
    from connectors.dingtalk.config import DingtalkConfig
    from connectors.feishu.config import FeishuConfig
    from connectors.notify.config import NotifyConfig
    from connectors.slack.config import SlackConfig
    from connectors.telegram.config import TelegramConfig
    from connectors.wecom.config import WecomConfig
    from connectors.wecom_aibot.config import WecomAibotConfig
    from core.config import BotConfig, KnowledgeConfig, ModelConfig, RouteConfig
    from tests.helpers import REPO

    # The docs site (docs/**/*.md) documents the keys; the README only points to it.
    readme = "\n".join(p.read_text() for p in sorted((REPO / "docs").rglob("*.md")))
    shipped = (REPO / "config.toml").read_text()
    named = {"bots": BotConfig, "knowledge": KnowledgeConfig, "wecom": WecomConfig, "telegram": TelegramConfig,
             "slack": SlackConfig, "notify": NotifyConfig, "wecom_aibot": WecomAibotConfig,
             "models": ModelConfig, "routes": RouteConfig, "dingtalk": DingtalkConfig, "feishu": FeishuConfig}
    missing = []
    for section, field in Config.model_fields.items():
        if field.exclude:
            continue
        model = named.get(section) or field.annotation
        if section == "tools":  # [tools.NAME]: a union on `type`, every member's keys
            from core.tools.config import CalculatorToolConfig, HttpToolConfig, McpToolConfig, SearchToolConfig

            models: list[type[BaseModel]] = [CalculatorToolConfig, HttpToolConfig, SearchToolConfig, McpToolConfig]
        else:
            assert isinstance(model, type) and issubclass(model, BaseModel), section
            models = [model]
        for key in (k for m in models for k in m.model_fields):
            if f"`{key}`" not in readme and f"`{section}.{key}`" not in readme and f"`{section}.NAME.{key}`" \
                    not in readme:
                missing.append(f"README: {section}.{key}")
            if not re.search(rf"^#? ?#? ?{re.escape(key)} =", shipped, re.M):
                missing.append(f"config.toml: {section}.{key}")
    assert not missing, missing
