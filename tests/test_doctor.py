"""``botd doctor`` against local fakes: the platforms' APIs (tests/fakes.py), a real redis-server,
real folders and the real embedded model. Each problem an admin would otherwise hear about from
users shows as ✗ with its fix; a good set-up is all ✓."""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bots.doctor import Check, check_knowledge, run_checks
from tests.fakes import FakeSlack, FakeTelegram, FakeWeCom, serve
from tests.helpers import RedisServer, make_config

AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTD_LANG", "en")
    monkeypatch.setenv("TG_TOKEN", "123:abc")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "s" * 32)
    monkeypatch.setenv("WECOM_TOKEN", "tok")
    monkeypatch.setenv("WECOM_AES_KEY", AES_KEY)
    monkeypatch.setenv("WECOM_SECRET", "app-secret-value")


def _platforms(tg: str, slack: str, wecom: str) -> dict[str, Any]:
    return {
        "telegram": {"assistant": {"token": "env:TG_TOKEN", "mode": "polling", "api_base": tg + "/bot"}},
        "slack": {"assistant": {"bot_token": "env:SLACK_BOT_TOKEN", "signing_secret": "env:SLACK_SIGNING_SECRET",
                                "api_base": slack + "/api/"}},
        "wecom": {"assistant": {"corp_id": "ww1436e0e65a779aee", "agent_id": 1000002, "token": "env:WECOM_TOKEN",
                                "encoding_aes_key": "env:WECOM_AES_KEY", "secret": "env:WECOM_SECRET",
                                "api_base": wecom}},
    }


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _knowledge(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text("# 年假\n员工每年有 15 天年假。Employees get 15 days of annual leave.\n")
    return docs


async def test_a_good_set_up_is_all_green(tmp_path: Path, redis_server: RedisServer) -> None:
    from core.knowledge.embedder import Embedder
    from core.knowledge.ingest import ingest

    redis_server.client().config_set("appendonly", "yes")
    tg, slack, wecom = FakeTelegram(), FakeSlack(), FakeWeCom()
    async with serve(tg.app()) as tg_url, serve(slack.app()) as slack_url, serve(wecom.app()) as wecom_url:
        docs = _knowledge(tmp_path)
        cfg = make_config(tmp_path, redis_server.url, knowledge={"hr": {"paths": [str(docs)]}},
                          **_platforms(tg_url, slack_url, wecom_url))
        ingest("hr", [docs], cfg.server.state_dir, Embedder(), 800)
        checks = await run_checks(cfg)
    bad = [c for c in checks if not c.ok]
    assert bad == [], bad
    names = _by_name(checks)
    for name in ("python", "llama.cpp", "model", "chat template", "memory", "redis", "telegram.assistant",
                 "slack.assistant", "wecom.assistant", "knowledge.hr", "state_dir"):
        assert name in names
    assert "AOF on" in names["redis"].detail


async def test_a_wrong_telegram_token_is_a_red_cross_with_its_fix(tmp_path: Path) -> None:
    tg, slack, wecom = FakeTelegram(), FakeSlack(), FakeWeCom()
    tg.fail_next["getMe"] = [{"ok": False, "error_code": 401, "description": "Unauthorized"}]
    async with serve(tg.app()) as tg_url, serve(slack.app()) as slack_url, serve(wecom.app()) as wecom_url:
        cfg = make_config(tmp_path, **_platforms(tg_url, slack_url, wecom_url))
        checks = _by_name(await run_checks(cfg, model=False))
    bad = checks["telegram.assistant"]
    assert not bad.ok and "401" in bad.detail and "BotFather" in bad.fix
    assert checks["slack.assistant"].ok and checks["wecom.assistant"].ok


async def test_a_wrong_wecom_secret_and_slack_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WECOM_SECRET", "wrong")
    tg, slack, wecom = FakeTelegram(), FakeSlack(), FakeWeCom()
    slack.fail_next["auth.test"] = [(200, {"ok": False, "error": "invalid_auth"}, {})]
    async with serve(tg.app()) as tg_url, serve(slack.app()) as slack_url, serve(wecom.app()) as wecom_url:
        cfg = make_config(tmp_path, **_platforms(tg_url, slack_url, wecom_url))
        checks = _by_name(await run_checks(cfg, model=False))
    assert not checks["wecom.assistant"].ok and "40001" in checks["wecom.assistant"].detail
    assert not checks["slack.assistant"].ok and "invalid_auth" in checks["slack.assistant"].detail


async def test_an_unreachable_redis_is_a_red_cross_with_its_fix(tmp_path: Path) -> None:
    from tests.helpers import free_port

    cfg = make_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0", redis={"socket_timeout_s": 0.5})
    redis = _by_name(await run_checks(cfg, model=False))["redis"]
    assert not redis.ok and "start Redis" in redis.fix
    # A password written into the URL is never shown.
    port = free_port()
    cfg = make_config(tmp_path, f"redis://:hunter2-secret@127.0.0.1:{port}/0", redis={"socket_timeout_s": 0.5})
    redis = _by_name(await run_checks(cfg, model=False))["redis"]
    assert not redis.ok and "hunter2" not in redis.detail and f"127.0.0.1:{port}" in redis.detail


async def test_redis_without_persistence_is_flagged(tmp_path: Path, redis_server: RedisServer) -> None:
    cfg = make_config(tmp_path, redis_server.url)  # the test server runs with --save "" --appendonly no
    redis = _by_name(await run_checks(cfg, model=False))["redis"]
    assert not redis.ok and "appendonly yes" in redis.fix


def _as_nobody(cfg: Any, conn: Any) -> None:
    os.setgid(65534)
    os.setuid(65534)
    conn.send([(c.name, c.ok, c.detail, c.fix) for c in check_knowledge(cfg)])


def test_an_unreadable_knowledge_folder_is_a_red_cross_with_its_fix(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="botd-doctor-"))
    try:
        base.chmod(0o755)
        docs = _knowledge(base)
        cfg = make_config(tmp_path, knowledge={"hr": {"paths": [str(docs)]}})
        docs.chmod(0)
        if os.geteuid() == 0:  # root reads everything: check as the unprivileged user a service runs as
            ctx = multiprocessing.get_context("fork")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_as_nobody, args=(cfg, child))
            proc.start()
            result = parent.recv()
            proc.join(30)
        else:
            result = [(c.name, c.ok, c.detail, c.fix) for c in check_knowledge(cfg)]
    finally:
        (base / "docs").chmod(0o755)
        import shutil

        shutil.rmtree(base)
    name, ok, detail, fix = result[0]
    assert name == "knowledge.hr" and not ok
    assert "Permission denied" in detail and "chmod" in fix


def test_cli_json_and_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bots.cli import main
    from tests.helpers import free_port

    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nstate_dir = "state"\n[redis]\nurl = "redis://127.0.0.1:{free_port()}/0"\n'
                      'socket_timeout_s = 0.5\n')
    assert main(["doctor", "--json", "--skip-model", "--config", str(config)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert [c["name"] for c in out["checks"] if not c["ok"]] == ["redis"]
    config.write_text('[server]\nstate_dir = "state"\n')
    assert main(["doctor", "--skip-model", "--config", str(config)]) == 0
    assert "✓ state_dir" in capsys.readouterr().out
    assert main(["doctor", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "✗ config" in capsys.readouterr().out


def test_the_systemd_units_paths_must_agree_with_the_config(tmp_path: Path) -> None:
    from bots.doctor import check_systemd

    root = Path(__file__).resolve().parent.parent
    shipped = (root / "systemd" / "botd.service").read_text()
    config = tmp_path / "config.toml"
    unit = tmp_path / "botd.service"
    # The shipped unit as an admin would install it from a checkout in the state folder's sibling.
    unit.write_text(shipped.replace("/opt/botd/.venv/bin/botd", str(root / ".venv" / "bin" / "botd"))
                    .replace("/etc/botd/config.toml", str(config)).replace("User=botd", "User=root"))
    good = make_config(tmp_path, server={"state_dir": "/var/lib/botd"})
    assert [c.ok for c in check_systemd(good, config, unit)] == [True]
    # state_dir outside what ProtectSystem=strict leaves writable; the shipped unit names another program.
    bad = make_config(tmp_path)
    unit.write_text(shipped)
    checks = check_systemd(bad, config, unit)
    details = " | ".join(c.detail for c in checks)
    assert all(not c.ok for c in checks)
    assert "ExecStart program /opt/botd/.venv/bin/botd is missing" in details
    assert "the service runs --config /etc/botd/config.toml" in details
    assert "read-only under ProtectSystem" in details
    assert check_systemd(bad, config, tmp_path / "none.service") == []  # no unit: nothing to say
    # The service's user must be able to write the state folder (root's 0755 folder: it cannot).
    state = tmp_path / "state"
    state.mkdir(mode=0o755, exist_ok=True)
    unit.write_text(shipped.replace("User=botd", "User=nobody").replace("ProtectSystem=strict", "ProtectSystem=no"))
    nobody = check_systemd(make_config(tmp_path), config, unit)
    assert any("User=nobody cannot write state_dir" in c.detail and "chown" in c.fix for c in nobody)


async def test_a_remote_engine_is_asked_for_its_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    async def models(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer right-key":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"object": "list", "data": [{"id": "qwen2.5-7b", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    async with serve(app) as url:
        def model_check(key: str, name: str) -> Any:
            monkeypatch.setenv("REMOTE_KEY", key)
            cfg = make_config(tmp_path, model={"engine": "openai", "base_url": url + "/v1",
                                               "api_key": "env:REMOTE_KEY", "model": name})
            return run_checks(cfg)

        good = _by_name(await model_check("right-key", "qwen2.5-7b"))["model"]
        assert good.ok and "qwen2.5-7b" in good.detail
        wrong_key = _by_name(await model_check("wrong", "qwen2.5-7b"))["model"]
        assert not wrong_key.ok and "401" in wrong_key.detail and "api_key" in wrong_key.fix
        wrong_model = _by_name(await model_check("right-key", "llama"))["model"]
        assert not wrong_model.ok and "not 'llama'" in wrong_model.detail
