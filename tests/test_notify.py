"""Admin alerts to a WeCom group robot ([notify], core/notify.py) against a fake robot webhook.

The notifier alone: the text in the configured language and format, the platform's limits
(20 a minute: a burst becomes 20 posts and one summary; 2048 bytes of text), the key never
in the log, a dead webhook logged once and never in the caller's way. Then wired into botd:
a real ingest that skips a corrupt document or fails, Redis (a real redis-server) going away
and coming back, and reloads (a new model, a model that does not load, a broken config).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bots import texts
from bots.daemon import Daemon
from connectors.config import config_from_dict, load_config
from connectors.notify.config import NOTIFY_DEFAULT_EVENTS
from connectors.notify.notifier import MAX_BYTES, Notifier, truncate_utf8, webhook_key
from core.config import ConfigError, Settings
from core.knowledge.store import KnowledgeStore
from core.redis_store import StoreUnavailable
from tests.fakes import serve
from tests.helpers import captured, free_port, make_config, running_daemon, wait_for

KEY = "693a91f6-7xxx-4bc4-97a0-0ec2SECRETKEY"


class FakeRobot:
    """POST /cgi-bin/webhook/send?key=...: records (time, key, body); answers errcode 0 unless told."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, str, dict[str, Any]]] = []
        self.errcodes: list[int] = []  # answered in order, then 0

    @property
    def contents(self) -> list[str]:
        return [b.get("text", b.get("markdown", {})).get("content", "") for _, _, b in self.posts]

    async def send(self, request: web.Request) -> web.Response:
        self.posts.append((time.monotonic(), request.query.get("key", ""), await request.json()))
        code = self.errcodes.pop(0) if self.errcodes else 0
        return web.json_response({"errcode": code, "errmsg": "ok" if code == 0 else "invalid webhook url"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/cgi-bin/webhook/send", self.send)
        return app


@pytest.fixture(autouse=True)
def robot_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTD_T_ROBOT", KEY)


@pytest.fixture
async def robot():
    fake = FakeRobot()
    async with serve(fake.app()) as url:
        fake.url = url  # type: ignore[attr-defined]
        yield fake


def notify_cfg(tmp_path: Path, url: str, **notify: Any):
    return make_config(tmp_path, server={"instance": "node-7"},
                       notify={"wecom_webhook": "env:BOTD_T_ROBOT", "url": url, **notify})


async def posted(robot: FakeRobot, n: int, timeout: float = 10.0) -> None:
    async def enough() -> bool:
        return len(robot.posts) >= n
    await wait_for(enough, timeout)


# -- the notifier alone ---------------------------------------------------------------------------


async def test_an_alert_arrives_in_the_chosen_language_and_format(tmp_path, robot):
    settings = Settings(notify_cfg(tmp_path, robot.url, mention=["zhangsan", "@all"]))
    assert settings.config.notify is not None and settings.config.notify.language == "zh"
    async with Notifier(settings, texts.alert) as notifier:
        await notifier.notify("ingest_failed", kb="hr", error="OSError: disk full")
        notifier.post("started", model="m", url="u")  # not among the default events: nothing sent
        await posted(robot, 1)
        _, key, body = robot.posts[0]
        assert key == KEY
        assert body["msgtype"] == "text" and body["text"]["mentioned_list"] == ["zhangsan", "@all"]
        assert body["text"]["content"] == ("【botd node-7】知识库 hr 重新读取失败，继续使用原有索引。"
                                           "原因：OSError: disk full")

        # English, markdown (mentions written into the text), read at each alert: a reload applies at once.
        cfg = settings.config
        settings.config = cfg.model_copy(update={"notify": cfg.notify.model_copy(
            update={"language": "en", "format": "markdown", "events": ["redis_down", "started"]})})
        notifier.post("ingest_failed", kb="hr", error="x")  # no longer listed
        notifier.post("redis_down", redis="redis://127.0.0.1:6379/0", error="ConnectionError")
        await posted(robot, 2)
        body = robot.posts[1][2]
        assert body["msgtype"] == "markdown"
        content = body["markdown"]["content"]
        assert content.startswith("[botd node-7] Redis is unreachable (redis://127.0.0.1:6379/0)")
        assert "ConnectionError" in content and content.endswith("<@zhangsan><@@all>")

        # A long Chinese detail is cut to the platform's byte limit, on a character boundary.
        settings.config = cfg
        notifier.post("ingest_failed", kb="hr", error="磁盘已满" * 1000)
        await posted(robot, 3)
    text = robot.posts[2][2]["text"]["content"]
    assert len(text.encode("utf-8")) <= MAX_BYTES["text"] and text.endswith("…")
    assert truncate_utf8("年假" * 3, 9) == "年假…" and truncate_utf8("年假" * 3, 8) == "年…"  # 3 bytes each
    assert len(robot.posts) == 3


async def test_without_the_section_nothing_is_sent_and_nothing_fails(tmp_path, robot):
    cfg = make_config(tmp_path)
    assert cfg.notify is None
    notifier = Notifier(Settings(cfg), texts.alert)
    notifier.post("redis_down", redis="r", error="e")  # not even started: a no-op
    async with notifier:
        await notifier.notify("redis_down", redis="r", error="e")
        await asyncio.sleep(0.1)
    assert robot.posts == []


def test_the_section_is_validated_and_the_key_never_repeated(tmp_path, monkeypatch):
    assert set(NOTIFY_DEFAULT_EVENTS) >= {"ingest_failed", "redis_down", "redis_up", "model_reload", "model_failed"}
    base = {"server": {"state_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"notify\.events.*unknown event 'redis_flap'"):
        config_from_dict({**base, "notify": {"wecom_webhook": "env:BOTD_T_ROBOT", "events": ["redis_flap"]}},
                         tmp_path / "c.toml")
    with pytest.raises(ConfigError, match=r"notify\.wecom_webhook: secrets are not written inline") as err:
        config_from_dict({**base, "notify": {"wecom_webhook": KEY}}, tmp_path / "c.toml")
    assert KEY not in str(err.value)
    with pytest.raises(ConfigError, match=r"notify\.language"):
        config_from_dict({**base, "notify": {"wecom_webhook": "env:BOTD_T_ROBOT", "language": "fr"}},
                         tmp_path / "c.toml")
    # The whole webhook URL is accepted in place of the key; something else is refused, unrepeated.
    url = f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={KEY}"
    monkeypatch.setenv("BOTD_T_ROBOT_URL", url)
    config_from_dict({**base, "notify": {"wecom_webhook": "env:BOTD_T_ROBOT_URL"}}, tmp_path / "c.toml")
    assert webhook_key(url) == KEY == webhook_key(KEY)
    monkeypatch.setenv("BOTD_T_ROBOT_URL", "not a key SECRET")
    with pytest.raises(ConfigError, match=r"notify\.wecom_webhook: a group robot's key") as err:
        config_from_dict({**base, "notify": {"wecom_webhook": "env:BOTD_T_ROBOT_URL"}}, tmp_path / "c.toml")
    assert "SECRET" not in str(err.value)


async def test_a_burst_of_30_alerts_makes_20_posts_in_the_window_and_one_summary(tmp_path, robot):
    window = 2.0
    settings = Settings(notify_cfg(tmp_path, robot.url, language="en"))
    async with Notifier(settings, texts.alert, window_s=window) as notifier:
        for i in range(30):
            notifier.post("ingest_failed", kb=f"kb{i}", error="boom")
        await posted(robot, 20)
        await asyncio.sleep(window / 2)
        assert len(robot.posts) == 20  # the window is full: the other 10 wait
        await posted(robot, 21, timeout=window * 3)
        await asyncio.sleep(0.3)
    assert len(robot.posts) == 21
    times = [t for t, _, _ in robot.posts]
    for i, t in enumerate(times):  # never more than 20 POSTs in any window
        assert sum(1 for u in times[i:] if u - t < window) <= 20
    assert times[20] - times[0] >= window * 0.95
    contents = robot.contents
    assert all(f"Knowledge base kb{i}:" in contents[i] for i in range(20))
    summary = contents[20]
    assert summary.startswith("[botd node-7] 10 more alerts, held back by the group robot's limit of 20 a minute")
    assert "ingest_failed ×10" in summary and "kb29" in summary and "kb20" in summary


async def test_the_key_is_never_logged_and_a_refusal_is_logged_once(tmp_path, robot):
    settings = Settings(notify_cfg(tmp_path, robot.url))
    robot.errcodes = [93000, 93000, 93000]
    with captured("debug", "json") as stream:
        async with Notifier(settings, texts.alert) as notifier:
            for i in range(4):
                notifier.post("ingest_failed", kb=f"kb{i}", error=f"key {KEY} in an error text")
            await posted(robot, 4)
            await asyncio.sleep(0.1)
    log = stream.getvalue()
    assert KEY not in log and "SECRETKEY" not in log, [ln for ln in log.splitlines() if "SECRET" in ln]
    errors = [json.loads(ln) for ln in log.splitlines() if '"level": "error"' in ln]
    assert [e["event"] for e in errors] == ["alert not sent: the webhook refused it"], errors
    assert errors[0]["errcode"] == 93000
    assert any("alerts are delivered again" in ln for ln in log.splitlines())
    # The secret in an alert's detail is masked in the alert too.
    assert all(KEY not in c for c in robot.contents) and "key *** in an error text" in robot.contents[3]


async def test_a_dead_webhook_is_logged_once_and_never_holds_the_caller(tmp_path):
    settings = Settings(notify_cfg(tmp_path, f"http://127.0.0.1:{free_port()}"))  # nothing listens
    with captured("info", "json") as stream:
        t0 = time.monotonic()
        async with Notifier(settings, texts.alert) as notifier:
            for i in range(5):
                await notifier.notify("redis_down", redis="r", error=f"e{i}")
            assert time.monotonic() - t0 < 0.1  # queued, not sent, by the caller
            await wait_for(lambda: _true(notifier.posts >= 5), timeout=10)
        assert time.monotonic() - t0 < 10
    log = stream.getvalue()
    errors = [json.loads(ln) for ln in log.splitlines() if '"level": "error"' in ln]
    assert [e["event"] for e in errors] == ["alert not sent: the webhook cannot be reached"]
    assert KEY not in log


async def _true(value: bool) -> bool:
    return value


# -- wired into botd ------------------------------------------------------------------------------


async def test_a_real_ingest_that_skips_a_document_or_fails_alerts_the_admins(tmp_path, robot):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text("# Leave\n\nEvery employee gets 27 days of annual leave.\n")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage\x00\xff" * 10)
    cfg = make_config(tmp_path, server={"instance": "node-7"},
                      notify={"wecom_webhook": "env:BOTD_T_ROBOT", "url": robot.url, "language": "en"},
                      knowledge={"hr": {"paths": [str(docs)], "schedule": ""}},
                      bots={"assistant": {"knowledge": ["hr"]}})
    daemon = Daemon(cfg)  # not started: its knowledge jobs and notifier, as the daemon wires them
    async with daemon.notifier:
        report = await daemon.knowledge.ingest("hr")
        assert report is not None and [s for s, _ in report.skipped] == ["broken.pdf"]
        await posted(robot, 1)
        assert robot.contents[0].startswith(
            "[botd node-7] Knowledge base hr was ingested, but 1 documents could not be read and were skipped: "
            "broken.pdf (")
        # The index folder cannot be written: the whole ingest fails.
        store = KnowledgeStore(cfg.server.state_dir, "hr")
        shutil.rmtree(store.dir)
        store.dir.write_text("not a folder")
        assert await daemon.knowledge.ingest("hr") is None
        await posted(robot, 2)
    assert robot.contents[1].startswith("[botd node-7] Knowledge base hr: the ingest failed; the previous index "
                                        "stays in use. Reason: ")
    assert len(robot.posts) == 2


def _toml(data: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                     for section, values in data.items())


async def test_redis_down_and_up_and_reloads_alert_once_each(tmp_path, robot, redis_server):
    data: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(tmp_path / "state"), "instance": "node-7"},
        "model": {"n_ctx": 2048, "max_tokens": 64, "n_threads": 2, "parallel": 1},
        "redis": {"url": redis_server.url, "socket_timeout_s": 0.5},
        "notify": {"wecom_webhook": "env:BOTD_T_ROBOT", "url": robot.url, "language": "zh",
                   "events": [*NOTIFY_DEFAULT_EVENTS, "started", "stopping"]},
    }
    path = tmp_path / "config.toml"
    path.write_text(_toml(data))
    async with running_daemon(load_config(path)) as api:
        daemon = api.daemon
        await posted(robot, 1)
        assert robot.contents[0].startswith("【botd node-7】已启动：模型 smollm2-135m，监听 http://127.0.0.1:")

        redis_server.stop()
        await posted(robot, 2)
        assert robot.contents[1].startswith(f"【botd node-7】无法连接 Redis（{redis_server.url}）")
        # Requests keep failing against the dead Redis: still one alert.
        for _ in range(3):
            await api.get("/healthz")
            with pytest.raises(StoreUnavailable):
                await daemon.runtime.redis.run("get", daemon.runtime.redis.client.get, "probe")
        await asyncio.sleep(2.5)  # the monitor checks every second while Redis is down
        assert len(robot.posts) == 2
        redis_server.start()
        await posted(robot, 3)
        assert robot.contents[2].startswith(f"【botd node-7】Redis 已恢复连接（{redis_server.url}），中断约 ")

        # Reloads: a new model loads; a model file that does not load; a config with an error.
        data["model"]["n_batch"] = 256
        path.write_text(_toml(data))
        assert await daemon.reload()
        await posted(robot, 4)
        assert robot.contents[3].startswith("【botd node-7】重新加载配置后已换用新模型 smollm2-135m（")
        bad = tmp_path / "broken.gguf"
        bad.write_bytes(b"GGUF" + b"\x00" * 64)
        data["model"]["path"] = str(bad)
        path.write_text(_toml(data))
        assert await daemon.reload()
        await posted(robot, 5)
        assert robot.contents[4].startswith("【botd node-7】新模型 smollm2-135m 加载失败，继续使用原模型。原因：")
        path.write_text(_toml(data) + "\n[model]\n")
        assert not await daemon.reload()
        await posted(robot, 6)
        assert robot.contents[5].startswith("【botd node-7】配置文件有误，重新加载被拒绝，继续使用当前配置：")
    await posted(robot, 7)
    assert robot.contents[6] == "【botd node-7】正在停止。"
    assert len(robot.posts) == 7
    assert sum("Redis" in c for c in robot.contents) == 2
