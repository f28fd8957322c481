"""``botd doctor`` against local fakes: the platforms' APIs (tests/fakes.py), a real redis-server,
real folders and the real embedded model. Each problem an admin would otherwise hear about from
users shows as ✗ with its fix; a good set-up is all ✓."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bots.doctor import Check, check_knowledge, run_checks
from tests.fake_dingtalk import FakeDingtalk
from tests.fake_feishu import FakeFeishu
from tests.fake_wecom_aibot import FakeAibot
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
    monkeypatch.setenv("DINGTALK_SECRET", FakeDingtalk().secret)
    monkeypatch.setenv("FEISHU_SECRET", FakeFeishu().secret)
    monkeypatch.setenv("WECOM_AIBOT_SECRET", FakeAibot().secret)


def _platforms(tg: str, slack: str, wecom: str) -> dict[str, Any]:
    return {
        "telegram": {"assistant": {"token": "env:TG_TOKEN", "mode": "polling", "api_base": tg + "/bot"}},
        "slack": {"assistant": {"bot_token": "env:SLACK_BOT_TOKEN", "signing_secret": "env:SLACK_SIGNING_SECRET",
                                "api_base": slack + "/api/"}},
        "wecom": {"assistant": {"corp_id": "ww1436e0e65a779aee", "agent_id": 1000002, "token": "env:WECOM_TOKEN",
                                "encoding_aes_key": "env:WECOM_AES_KEY", "secret": "env:WECOM_SECRET",
                                "api_base": wecom}},
    }


def _chinese_platforms(dt: FakeDingtalk, fs: FakeFeishu, ab: FakeAibot) -> dict[str, Any]:
    return {
        "dingtalk": {"assistant": {"client_id": dt.client_id, "client_secret": "env:DINGTALK_SECRET",
                                   "api_base": dt.url, "oapi_base": dt.url}},
        "feishu": {"assistant": {"app_id": fs.app_id, "app_secret": "env:FEISHU_SECRET", "api_base": fs.url}},
        "wecom_aibot": {"assistant": {"mode": "websocket", "bot_id": ab.bot_id, "secret": "env:WECOM_AIBOT_SECRET",
                                      "ws_url": ab.ws_url}},
    }


@contextlib.asynccontextmanager
async def _chinese_fakes() -> AsyncIterator[tuple[FakeDingtalk, FakeFeishu, FakeAibot]]:
    dt, fs, ab = FakeDingtalk(), FakeFeishu(), FakeAibot()
    async with serve(dt.app()) as dt.url, serve(fs.app()) as fs.url, serve(ab.app()) as ab.url:
        yield dt, fs, ab


@contextlib.asynccontextmanager
async def _botd_front() -> AsyncIterator[str]:
    """botd's own HTTP server (its /healthz), as a reverse proxy would reach it."""
    from connectors.server import build_app

    async with serve(build_app(1 << 20, lambda: {"model_loaded": True, "redis": "ok"})) as url:
        yield url


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _knowledge(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text("# 年假\n员工每年有 15 天年假。Employees get 15 days of annual leave.\n")
    return docs


async def test_a_good_set_up_is_all_green(tmp_path: Path, redis_server: RedisServer) -> None:
    from core.config import embedded_model_path
    from core.knowledge.embedder import Embedder
    from core.knowledge.ingest import ingest

    redis_server.client().config_set("appendonly", "yes")
    tg, slack, wecom = FakeTelegram(), FakeSlack(), FakeWeCom()
    async with serve(tg.app()) as tg_url, serve(slack.app()) as slack_url, serve(wecom.app()) as wecom_url, \
            _chinese_fakes() as (dt, fs, ab), _botd_front() as front:
        docs = _knowledge(tmp_path)
        cfg = make_config(tmp_path, redis_server.url, knowledge={"hr": {"paths": [str(docs)]}},
                          models={"small": {"path": str(embedded_model_path())}},
                          **_platforms(tg_url, slack_url, wecom_url), **_chinese_platforms(dt, fs, ab))
        ingest("hr", [docs], cfg.server.state_dir, Embedder(), 800)
        checks = await run_checks(cfg, public_url=front)
    bad = [c for c in checks if not c.ok]
    assert bad == [], bad
    names = _by_name(checks)
    for name in ("python", "llama.cpp", "model", "chat template", "memory", "models.small",
                 "models.small chat template", "models.small memory", "redis", "telegram.assistant",
                 "slack.assistant", "wecom.assistant", "wecom_aibot.assistant", "dingtalk.assistant",
                 "feishu.assistant", "public_url", "knowledge.hr", "state_dir"):
        assert name in names
    assert "AOF on" in names["redis"].detail
    assert ab.subscribes == [(ab.bot_id, True)] and not ab.connected()  # signed in, then let go
    assert dt.token_requests == 1 and fs.token_requests == 1
    assert front in names["public_url"].detail and "/slack/events/assistant" in names["public_url"].detail


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


async def test_a_wrong_dingtalk_feishu_or_ai_bot_secret_is_a_red_cross_with_its_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINGTALK_SECRET", "wrong-dingtalk-secret")
    monkeypatch.setenv("FEISHU_SECRET", "wrong-feishu-secret")
    monkeypatch.setenv("WECOM_AIBOT_SECRET", "wrong-aibot-secret")
    async with _chinese_fakes() as (dt, fs, ab):
        cfg = make_config(tmp_path, **_chinese_platforms(dt, fs, ab))
        checks = _by_name(await run_checks(cfg, model=False))
    ding, feishu, aibot = checks["dingtalk.assistant"], checks["feishu.assistant"], checks["wecom_aibot.assistant"]
    assert not ding.ok and "invalidClientIdOrSecret" in ding.detail and "Client Secret" in ding.fix
    assert not feishu.ok and "10014" in feishu.detail and "App Secret" in feishu.fix
    assert not aibot.ok and "40058" in aibot.detail and "BotID" in aibot.fix
    assert ab.subscribes == [(ab.bot_id, False)]
    for c in (ding, feishu, aibot):  # what was sent is never shown back
        assert "wrong-" not in c.detail + c.fix


async def test_a_running_botd_keeps_its_ai_bot_connection(tmp_path: Path, redis_server: RedisServer) -> None:
    """WeCom keeps one long connection per bot: the doctor's own subscription would displace the
    daemon's. While a daemon holds the bot's lease, the doctor leaves the connection alone."""
    async with _chinese_fakes() as (dt, fs, ab):
        cfg = make_config(tmp_path, redis_server.url, **_chinese_platforms(dt, fs, ab))
        redis_server.client().set(f"{cfg.redis.key_prefix}:lease:wecom_aibot:ws:{ab.bot_id}", "7", px=30_000)
        aibot = _by_name(await run_checks(cfg, model=False))["wecom_aibot.assistant"]
    assert aibot.ok and "running botd holds" in aibot.detail
    assert ab.subscribes == []


async def test_the_public_url_must_reach_botd(tmp_path: Path) -> None:
    from aiohttp import web

    from tests.helpers import free_port

    cfg = make_config(tmp_path, dingtalk={"assistant": {"client_id": "ding_x", "client_secret": "env:DINGTALK_SECRET",
                                                        "api_base": f"http://127.0.0.1:{free_port()}",
                                                        "mode": "callback"}})
    nowhere = f"http://127.0.0.1:{free_port()}"
    unreachable = _by_name(await run_checks(cfg, model=False, public_url=nowhere))["public_url"]
    assert not unreachable.ok and "reverse proxy" in unreachable.fix
    async with serve(web.Application()) as other:  # a server that is not botd (a default vhost)
        elsewhere = _by_name(await run_checks(cfg, model=False, public_url=other))["public_url"]
    assert not elsewhere.ok and "HTTP 404, not botd's answer" in elsewhere.detail
    async with _botd_front() as front:
        good = _by_name(await run_checks(cfg, model=False, public_url=front + "/"))["public_url"]
    assert good.ok and f"{front}/dingtalk/assistant" in good.detail and "https://" in good.detail


def test_the_public_url_flag_fails_the_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bots.cli import main
    from tests.helpers import free_port

    config = tmp_path / "c.toml"
    config.write_text('[server]\nstate_dir = "state"\n')
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["doctor", "--json", "--skip-model", "--public-url", nowhere, "--config", str(config)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in out["checks"] if not c["ok"]] == ["public_url"]


async def test_a_named_models_missing_file_is_a_red_cross_with_its_fix(tmp_path: Path) -> None:
    (tmp_path / "gone.gguf").write_bytes(b"GGUF")  # check-config needs the file; it goes away afterwards
    cfg = make_config(tmp_path, models={"big": {"path": str(tmp_path / "gone.gguf")}})
    (tmp_path / "gone.gguf").unlink()
    checks = _by_name(await run_checks(cfg))
    big = checks["models.big"]
    assert not big.ok and "no such file" in big.detail and "--set-default --as big" in big.fix
    assert checks["model"].ok  # [model] itself is fine


async def test_a_chinese_admin_reads_the_report_in_chinese(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BOTD_LANG=zh: the words around the raw values (paths, names, platform codes) are Chinese too."""
    from tests.helpers import free_port

    monkeypatch.setenv("BOTD_LANG", "zh")
    tg, slack, wecom = FakeTelegram(), FakeSlack(), FakeWeCom()
    tg.fail_next["getWebhookInfo"] = [{"ok": True, "result": {"url": "https://elsewhere.example/hook"}}]
    (tmp_path / "gone.gguf").write_bytes(b"GGUF")  # check-config needs the file; it goes away afterwards
    (tmp_path / "bad.gguf").write_bytes(b"GGUF")  # cut short
    async with _chinese_fakes() as (dt, fs, ab), serve(tg.app()) as tg_url, serve(slack.app()) as slack_url, \
            serve(wecom.app()) as wecom_url:
        platforms = _platforms(tg_url, slack_url, wecom_url)
        platforms["telegram"]["unreachable"] = {"token": "env:TG_TOKEN", "mode": "polling",
                                                "api_base": f"http://127.0.0.1:{free_port()}/bot"}
        cfg = make_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0", redis={"socket_timeout_s": 0.5},
                          models={"gone": {"path": str(tmp_path / "gone.gguf")},
                                  "bad": {"path": str(tmp_path / "bad.gguf")}},
                          bots={"assistant": {}, "unreachable": {}}, **platforms, **_chinese_platforms(dt, fs, ab))
        (tmp_path / "gone.gguf").unlink()
        checks = _by_name(await run_checks(cfg))
    assert "无法连接 Bot API" in checks["telegram.unreachable"].detail
    assert "轮询" in checks["telegram.assistant webhook"].detail
    assert "文件不存在" in checks["models.gone"].detail and "无法读取" in checks["models.bad"].detail
    assert "需要" in checks["memory"].detail and "启动 Redis" in checks["redis"].fix
    assert "成功" in checks["wecom.assistant"].detail and "可写" in checks["state_dir"].detail
    assert "令牌" in checks["dingtalk.assistant"].detail and "令牌" in checks["feishu.assistant"].detail
    english = ("unreachable", "no such file", "not installed", "polling gets nothing", "gettoken ok", "access token",
               "writable", "the server serves", "needed at", "available", "in the build", "subscribed as",
               "AOF on", "AOF off", "index built", "cannot", "does not exist", "is missing")
    for c in checks.values():
        for phrase in english:
            assert phrase not in c.detail and phrase not in c.fix, (c, phrase)
