"""``botd init`` run as a script would: a config that check-config accepts, secrets in 0600 files
referenced as file:, and a second run that changes nothing."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from bots.cli import main
from tests.fake_model_hub import FakeHub, HubThread


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTD_LANG", "en")
    monkeypatch.setenv("INIT_TG_TOKEN", "123456:telegram-secret-token")
    monkeypatch.setenv("INIT_API_KEY", "api-key-0123456789abcdef")


def _init(config: Path, *extra: str) -> int:
    return main(["init", "--non-interactive", "--config", str(config), "--state-dir", str(config.parent / "state"),
                 "--language", "zh", "--telegram-token-env", "INIT_TG_TOKEN", "--api-key-env", "INIT_API_KEY", *extra])


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_interactive_init_writes_a_config_check_config_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    assert _init(config) == 0
    assert main(["check-config", "--config", str(config)]) == 0
    text = config.read_text()
    assert "telegram-secret-token" not in text and "api-key-0123" not in text  # never inline
    data = tomllib.loads(text)
    token_ref = data["telegram"]["assistant"]["token"]
    assert token_ref.startswith("file:")
    token_file = Path(token_ref.removeprefix("file:"))
    assert token_file.read_text().strip() == "123456:telegram-secret-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    key_file = Path(data["api"]["keys"][0].removeprefix("file:"))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert data["bots"]["assistant"]["language"] == "zh"
    assert "botd doctor" in capsys.readouterr().out


def test_a_second_run_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    assert _init(config) == 0
    before = _snapshot(tmp_path)
    assert _init(config) == 0
    assert _snapshot(tmp_path) == before  # bytes, modification times and modes
    assert "nothing to change" in capsys.readouterr().out


def test_init_on_an_existing_config_changes_only_what_it_is_asked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    original = (Path(__file__).resolve().parent.parent / "config.toml").read_text()
    config.write_text(original)
    assert main(["init", "--non-interactive", "--config", str(config), "--language", "en"]) == 0
    text = config.read_text()
    # Every comment and every other key kept; only [bots.assistant] language set.
    assert [x for x in original.splitlines() if x.startswith("#")] == [x for x in text.splitlines()
                                                                        if x.startswith("#")]
    old, new = tomllib.loads(original), tomllib.loads(text)
    new["bots"]["assistant"].pop("language")
    old["bots"]["assistant"].pop("language", None)
    assert old == new


def test_a_bad_language_changes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    assert _init(config) == 0
    before = _snapshot(tmp_path)
    assert main(["init", "--non-interactive", "--config", str(config), "--language", "fr"]) == 1
    assert _snapshot(tmp_path) == before


def test_every_platform_and_a_console_admin_and_their_webhook_urls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"SLACK_TOKEN": "xoxb-123-abc", "SLACK_SIGNING": "s" * 32, "WECOM_SECRET": "wecom-app-secret",
           "WECOM_TOKEN": "wecomtoken", "WECOM_AES": "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt",
           "CONSOLE_PASSWORD": "correct horse battery"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = tmp_path / "config.toml"
    args = ["--slack-token-env", "SLACK_TOKEN", "--slack-signing-secret-env", "SLACK_SIGNING",
            "--wecom-corp-id", "ww1436e0e65a779aee", "--wecom-secret-env", "WECOM_SECRET",
            "--wecom-token-env", "WECOM_TOKEN", "--wecom-aes-key-env", "WECOM_AES",
            "--console-admin", "root", "--console-password-env", "CONSOLE_PASSWORD",
            "--public-url", "https://bot.example.com"]
    assert _init(config, *args) == 0
    out = capsys.readouterr().out
    assert "https://bot.example.com/telegram/assistant" in out
    assert "https://bot.example.com/slack/events/assistant" in out
    assert "https://bot.example.com/wecom/assistant" in out
    assert main(["check-config", "--config", str(config)]) == 0
    text = config.read_text()
    assert all(v not in text for v in env.values())  # every secret in its own file
    data = tomllib.loads(text)
    assert data["console"]["enabled"] is True and data["console"]["users"]["root"]["role"] == "admin"
    assert data["console"]["users"]["root"]["password_hash"].startswith("$argon2")
    for p in (tmp_path / "secrets").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    before = _snapshot(tmp_path)
    assert _init(config, *args) == 0  # the salted hash and the generated signing key are kept
    assert _snapshot(tmp_path) == before


def _expect(fd: int, text: str, seen: list[str], timeout: float = 20) -> None:
    import os as _os
    import select
    import time

    deadline = time.monotonic() + timeout
    while text not in seen[0]:
        left = deadline - time.monotonic()
        assert left > 0, f"waited for {text!r}; got {seen[0][-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = _os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"the process ended before {text!r}; got {seen[0][-500:]!r}"
            seen[0] += chunk.decode(errors="replace")
            seen[1] += chunk.decode(errors="replace")  # everything the terminal showed
    seen[0] = seen[0][seen[0].index(text) + len(text):]


def _tiny_catalogue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> bytes:
    """A small model on the fake hub, in a catalogue of the admin's own (BOTD_CATALOGUE)."""
    import hashlib

    data = b"GGUF\x03\x00\x00\x00" + os.urandom(1 << 20)  # check-config reads a GGUF's magic
    hub.files["tiny.gguf"] = data
    (tmp_path / "extra.toml").write_text(
        '[[models]]\nname = "tiny"\nquant = "Q4_0"\nlicence = "Apache-2.0"\nparams_b = 0.1\nlayers = 2\n'
        'kv_heads = 1\nhead_dim = 8\nmodelscope = "t/tiny"\nhuggingface = "t/tiny"\nconfirmed = true\n'
        f'evidence = "test"\nfiles = [{{ name = "tiny.gguf", size = {len(data)}, '
        f'sha256 = "{hashlib.sha256(data).hexdigest()}" }}]\n')
    for k, v in {"BOTD_CATALOGUE": str(tmp_path / "extra.toml"), "HF_ENDPOINT": hub.url,
                 "BOTD_MODELSCOPE_ENDPOINT": hub.url}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("BOTD_MODELS_DIR", raising=False)
    return data


def test_init_pulls_a_model_and_points_the_config_at_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubThread(FakeHub()) as hub:
        data = _tiny_catalogue(tmp_path, monkeypatch, hub)
        config = tmp_path / "config.toml"
        assert _init(config, "--pull", "tiny") == 0
    path = Path(tomllib.loads(config.read_text())["model"]["path"])
    assert path == tmp_path / "state" / "models" / "tiny.gguf" and path.read_bytes() == data
    assert main(["check-config", "--config", str(config)]) == 0


def test_interactive_init_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The questions, answered as a person would at a terminal (a pseudo-terminal here); secrets
    are typed where nothing echoes them; a model that fits is offered and downloaded."""
    import os as _os
    import pty
    import sys

    config = tmp_path / "config.toml"
    with HubThread(FakeHub()) as hub:
        data = _tiny_catalogue(tmp_path, monkeypatch, hub)
        pid, fd = pty.fork()
        if pid == 0:  # the child: botd init on the terminal
            _os.environ["BOTD_LANG"] = "en"
            _os.execv(sys.executable, [sys.executable, "-c",
                                       f"import sys; from bots.cli import main; sys.exit(main(['init', '--config', "
                                       f"{str(config)!r}]))"])
        seen = ["", ""]
        try:
            for prompt, answer in (("state directory", str(tmp_path / "state")), ("model file", ""),
                                   ("language", "zh"), ("Telegram bot token", "123456:typed-token"),
                                   ("Slack bot token", ""), ("web console admin", ""), ("HTTP API key", ""),
                                   ("download one now", "tiny")):
                _expect(fd, prompt, seen)
                _os.write(fd, answer.encode() + b"\r")
            _expect(fd, "next steps", seen)
        finally:
            _, status = _os.waitpid(pid, 0)
            _os.close(fd)
    assert _os.waitstatus_to_exitcode(status) == 0
    assert Path(tomllib.loads(config.read_text())["model"]["path"]).read_bytes() == data
    assert "typed-token" not in seen[1] and "zh" in seen[1]  # the secret never echoed, the rest echoed
    written = tomllib.loads(config.read_text())
    assert written["bots"]["assistant"]["language"] == "zh"
    assert written["server"]["state_dir"] == str(tmp_path / "state")
    token_file = Path(written["telegram"]["assistant"]["token"].removeprefix("file:"))
    assert token_file.read_text().strip() == "123456:typed-token"
    assert main(["check-config", "--config", str(config)]) == 0
