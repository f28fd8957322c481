"""``botd init``: write a working config.toml and its secret files, asking (or taking flags).

Secrets never go into config.toml: each is written to its own file, mode 0600 in a 0700 folder
(``secrets/`` beside the config), and referenced as ``file:PATH``. Secret values come from a
prompt that does not echo, or, for scripts, from environment variables named by flags
(``--telegram-token-env NAME``) -- never from the command line, which other users can read in ps.

Run twice, it changes nothing it was not asked to: an existing config.toml is edited in place
with tomlkit (comments, other keys and sections kept), a file whose contents would not change is
not rewritten, and the edited config must pass check-config before it replaces the old one.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

import tomlkit

from bots.admin_texts import lang

_TEMPLATE = """\
# botd configuration, written by `botd init`. Check it with: botd check-config --config {config}
# Secrets are never written here: each lives in its own file (mode 0600) named as "file:PATH".

[server]
# Where botd keeps its data (embedded Redis data, indexes). systemd: /var/lib/botd.
state_dir = "state"

[model]
# A GGUF file; empty: the embedded SmolLM2-135M-Instruct (English only). For Chinese:
# botd model pull qwen2.5-1.5b-instruct-q4_k_m --set-default
path = ""

[bots.assistant]
# The persona: the system prompt put before every conversation.
system_prompt = "You are a helpful assistant. Answer briefly and accurately."
# The language of what botd itself says: "zh", "en" or "auto" (the user's language).
language = "auto"
"""


def _t(zh: str, en: str) -> str:
    return zh if lang() == "zh" else en


def write_if_changed(path: Path, text: str, mode: int) -> bool:
    """Write ``text`` to ``path`` (atomically, with ``mode``) unless it holds exactly that; True if written."""
    try:
        if path.read_text(encoding="utf-8") == text and (path.stat().st_mode & 0o777) == mode:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)  # the umask may have taken bits off
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _secret(folder: Path, name: str, value: str) -> str:
    """Write a secret to its own 0600 file; its reference for config.toml."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    write_if_changed(path, value.strip() + "\n", 0o600)
    return f"file:{path}"


def _ask(prompt: str, default: str, interactive: bool) -> str:
    if not interactive:
        return default
    answer = input(f"{prompt} [{default}]: ").strip()
    return answer or default


def _table(doc: Any, *keys: str) -> Any:
    node = doc
    for i, key in enumerate(keys):
        if key not in node:
            node[key] = tomlkit.table(is_super_table=i < len(keys) - 1)
        node = node[key]
    return node


def run(args: argparse.Namespace) -> int:
    from bots.config_edit import ConfigEditError, write_checked

    config: Path = args.config.resolve()
    interactive = not args.non_interactive and sys.stdin.isatty()
    existing = config.read_text(encoding="utf-8") if config.exists() else None
    doc = tomlkit.parse(existing if existing is not None else _TEMPLATE.format(config=config))
    secrets = config.parent / "secrets"
    bot = args.bot
    changes: list[str] = []

    def set_key(table: Any, key: str, value: Any, where: str) -> None:
        if table.get(key) != value:
            table[key] = value
            changes.append(f"{where}.{key}")

    current_state = str(_table(doc, "server").get("state_dir", "state"))
    state = args.state_dir or _ask(_t("数据目录", "state directory"), current_state, interactive and existing is None)
    if args.state_dir or existing is None:
        set_key(_table(doc, "server"), "state_dir", state, "server")
    model = args.model_path or _ask(_t("模型文件（GGUF，空：内置英文小模型）", "model file (GGUF; empty: the embedded "
                                       "English-only model)"), str(_table(doc, "model").get("path", "")),
                                    interactive and existing is None)
    if args.model_path or (existing is None and model):
        set_key(_table(doc, "model"), "path", str(Path(model).expanduser().resolve()) if model else "", "model")
    bot_table = _table(doc, "bots", bot)
    if "system_prompt" not in bot_table:
        set_key(bot_table, "system_prompt", "You are a helpful assistant. Answer briefly and accurately.",
                f"bots.{bot}")
    language = args.language or _ask(_t("机器人的语言 zh/en/auto", "the bots' language zh/en/auto"),
                                     str(bot_table.get("language", "auto")), interactive and existing is None)
    if language not in ("zh", "en", "auto"):
        print(f"botd: --language: {language!r} is not zh, en or auto", file=sys.stderr)
        return 1
    set_key(bot_table, "language", language, f"bots.{bot}")

    token = _value(args.telegram_token_env, _t("Telegram 机器人令牌（@BotFather；空：跳过）",
                                               "Telegram bot token (from @BotFather; empty: skip)"), interactive)
    if token:
        ref = _secret(secrets, f"telegram-{bot}-token", token)
        tg = _table(doc, "telegram", bot)
        set_key(tg, "token", ref, f"telegram.{bot}")
        if "mode" not in tg:
            set_key(tg, "mode", "polling", f"telegram.{bot}")
    slack = _value(args.slack_token_env,
                   _t("Slack 机器人令牌 xoxb-（空：跳过）", "Slack bot token xoxb- (empty: skip)"),
                   interactive and existing is None)
    if slack:
        signing = _value(args.slack_signing_secret_env, _t("Slack Signing Secret", "Slack signing secret"),
                         interactive)
        if not signing:
            raise SystemExit("botd: a Slack app in HTTP mode needs its signing secret (--slack-signing-secret-env)")
        sl = _table(doc, "slack", bot)
        set_key(sl, "bot_token", _secret(secrets, f"slack-{bot}-bot-token", slack), f"slack.{bot}")
        set_key(sl, "signing_secret", _secret(secrets, f"slack-{bot}-signing-secret", signing), f"slack.{bot}")
    if args.wecom_corp_id:
        values = {k: _value(getattr(args, f"wecom_{k}_env"), k, interactive) for k in ("secret", "token", "aes_key")}
        if not all(values.values()):
            raise SystemExit("botd: WeCom needs --wecom-secret-env, --wecom-token-env and --wecom-aes-key-env")
        wc = _table(doc, "wecom", bot)
        set_key(wc, "corp_id", args.wecom_corp_id, f"wecom.{bot}")
        set_key(wc, "agent_id", args.wecom_agent_id, f"wecom.{bot}")
        set_key(wc, "secret", _secret(secrets, f"wecom-{bot}-secret", values["secret"]), f"wecom.{bot}")
        set_key(wc, "token", _secret(secrets, f"wecom-{bot}-token", values["token"]), f"wecom.{bot}")
        set_key(wc, "encoding_aes_key", _secret(secrets, f"wecom-{bot}-aes-key", values["aes_key"]), f"wecom.{bot}")
    admin_prompt = _t("Web 控制台管理员用户名（空：跳过）", "web console admin login (empty: skip)")
    admin = args.console_admin or _ask(admin_prompt, "", interactive and existing is None)
    if admin:
        _console_admin(doc, secrets, admin, _value(args.console_password_env, _t("密码", "password"), interactive),
                       set_key)
    key = _value(args.api_key_env, _t("HTTP API 密钥（空：跳过）", "HTTP API key (empty: skip)"), interactive)
    if key:
        ref = _secret(secrets, "api-key", key)
        api = _table(doc, "api")
        keys = list(api.get("keys", []))
        if ref not in keys:
            api["keys"] = [*keys, ref]
            changes.append("api.keys")

    text = tomlkit.dumps(doc)
    if text == existing:
        print(_t(f"{config} 无需改动。", f"{config}: nothing to change."))
    else:
        try:
            write_checked(config, text, check_secrets=True)
        except ConfigEditError as exc:
            print(f"botd: {exc}", file=sys.stderr)
            return 1
        print(_t(f"已写入 {config}：", f"wrote {config}: ") + (", ".join(changes) or "-"))
    pull = args.pull
    if pull is None and interactive and not doc.get("model", {}).get("path"):
        pull = _offer_model(doc)
    if pull:
        code = _pull(config, pull, doc, bot)
        if code:
            return code
    print(_t("下一步：", "next steps:"))
    if args.public_url:
        base = args.public_url.rstrip("/")
        for platform, path in (("telegram", f"/telegram/{bot}"), ("slack", f"/slack/events/{bot}"),
                               ("wecom", f"/wecom/{bot}")):
            if bot in doc.get(platform, {}):
                print(_t(f"  {platform} 的回调地址（填到平台后台）：{base}{path}",
                         f"  {platform} webhook URL (paste it into the platform's console): {base}{path}"))
    print(f"  botd model list            # {_t('选一个中文模型', 'pick a Chinese-speaking model')}")
    print(f"  botd model pull qwen2.5-1.5b-instruct-q4_k_m --set-default --config {config}")
    print(f"  botd doctor --config {config}")
    print(f"  botd run --config {config}   # systemd: sudo cp systemd/botd.service /etc/systemd/system/ && "
          "sudo systemctl enable --now botd")
    return 0


def _fitting_models(doc: Any) -> list[Any]:
    """Catalogue models with a confirmed checksum that fit this box's RAM at the config's n_ctx x parallel."""
    from bots.models_catalogue import load_catalogue, total_ram

    model = doc.get("model", {})
    n_ctx, parallel = int(model.get("n_ctx", 4096)), int(model.get("parallel", 4))
    ram = total_ram() or 0
    cores = os.cpu_count() or 1
    fits = [m for m in load_catalogue().models.values()
            if m.verifiable and not m.embedding
            and (not ram or m.ram_needed(n_ctx, parallel) <= ram * 0.8) and m.params_b <= 2 * cores]
    return sorted(fits, key=lambda m: (-m.params_b, m.quant))


def _offer_model(doc: Any) -> str:
    """Interactive: the models that fit, and which one to download now (Enter: none)."""
    from bots.admin_texts import size_text

    fits = _fitting_models(doc)
    if not fits:
        return ""
    print(_t("适合本机、会说中文的模型（校验和已确认）：", "models that fit this box and speak Chinese (checksums "
             "confirmed):"))
    for m in fits[:6]:
        print(f"  {m.name:<32} {size_text(m.size):>9}  {m.licence}")
    return _ask(_t("现在下载哪一个（空：跳过）", "download one now (empty: skip)"), "", True)


def _pull(config: Path, name: str, doc: Any, bot: str) -> int:
    """Download a catalogue model into STATE_DIR/models and point [model] path at it."""
    import asyncio

    from bots.config_edit import ConfigEditError, set_model_path
    from bots.model_pull import Puller, PullError
    from bots.models_catalogue import load_catalogue

    found = load_catalogue().get(name)
    if found is not None and found.embedding:  # [model] takes a chat model; this one is for [embeddings]
        print(f"botd: {name!r}: " + _t("这是嵌入模型：botd model pull 名称 --set-default", "an embedding model: "
                                       "botd model pull NAME --set-default"), file=sys.stderr)
        return 1
    if found is None:
        print(f"botd: {name!r}: " + _t("目录中没有此模型（botd model list）", "not in the catalogue (botd model list)"),
              file=sys.stderr)
        return 1
    state = Path(str(doc.get("server", {}).get("state_dir", "state"))).expanduser()
    models_dir = Path(os.environ.get("BOTD_MODELS_DIR", "") or (state if state.is_absolute()
                                                                  else config.parent / state) / "models")
    try:
        paths = asyncio.run(Puller(models_dir, progress=sys.stderr.isatty()).pull(found))
        for line in set_model_path(config, paths[0], found.name):
            print(line)
    except (PullError, ConfigEditError) as exc:
        print(f"botd: {exc}", file=sys.stderr)
        return 1
    return 0


def _console_admin(doc: Any, secrets: Path, name: str, password: str, set_key: Any) -> None:
    """[console] enabled with a signing key (generated once) and [console.users.NAME] an admin."""
    import re
    import secrets as random

    from core.auth import hash_password, verify_password

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise SystemExit(f"botd: console user {name!r}: use 1-64 letters, digits, '.', '-' and '_'")
    if len(password) < 8:
        raise SystemExit("botd: a console password needs at least 8 characters (--console-password-env)")
    console = _table(doc, "console")
    set_key(console, "enabled", True, "console")
    if "signing_key" not in console:
        key_file = secrets / "console-signing-key"
        value = key_file.read_text().strip() if key_file.exists() else random.token_hex(32)
        set_key(console, "signing_key", _secret(secrets, "console-signing-key", value), "console")
    user = _table(doc, "console", "users", name)
    # A salted hash differs each time: keep the one there if it already matches this password.
    if not verify_password(user.get("password_hash"), password):
        set_key(user, "password_hash", hash_password(password), f"console.users.{name}")
    set_key(user, "role", "admin", f"console.users.{name}")


def _value(env_name: str | None, prompt: str, interactive: bool) -> str:
    """A secret from the environment variable ``env_name``, else a prompt that does not echo."""
    if env_name:
        value = os.environ.get(env_name, "")
        if not value:
            raise SystemExit(f"botd: the environment variable {env_name} is empty or unset")
        return value
    if interactive:
        return getpass.getpass(f"{prompt}: ").strip()
    return ""


def add_parser(sub: Any, with_config: Any) -> None:
    sp = with_config(sub.add_parser("init", help="write config.toml and its secret files (asks, or takes flags)"))
    sp.add_argument("--non-interactive", action="store_true", help="ask nothing; only what the flags say")
    sp.add_argument("--state-dir", help="where botd keeps its data")
    sp.add_argument("--model-path", help="a GGUF file for [model] path")
    sp.add_argument("--language", help="zh, en or auto: the language of the bot's own texts")
    sp.add_argument("--bot", default="assistant", help="the bot's name (default: assistant)")
    sp.add_argument("--telegram-token-env", metavar="VAR",
                    help="read the Telegram bot token from this environment variable (never from the command line)")
    sp.add_argument("--api-key-env", metavar="VAR", help="read an HTTP API key from this environment variable")
    sp.add_argument("--slack-token-env", metavar="VAR", help="the Slack bot token (xoxb-...) from this variable")
    sp.add_argument("--slack-signing-secret-env", metavar="VAR",
                    help="the Slack app's signing secret from this variable")
    sp.add_argument("--wecom-corp-id", help="WeCom: the corp id (企业ID) of a self-built app")
    sp.add_argument("--wecom-agent-id", type=int, default=1000002, help="WeCom: the app's AgentId")
    sp.add_argument("--wecom-secret-env", metavar="VAR", help="WeCom: the app's Secret from this variable")
    sp.add_argument("--wecom-token-env", metavar="VAR", help="WeCom: the callback Token from this variable")
    sp.add_argument("--wecom-aes-key-env", metavar="VAR", help="WeCom: the callback EncodingAESKey from this variable")
    sp.add_argument("--console-admin", metavar="NAME", help="a first web console admin (enables the console)")
    sp.add_argument("--console-password-env", metavar="VAR", help="the console admin's password from this variable")
    sp.add_argument("--pull", metavar="MODEL", help="download this catalogue model and point [model] path at it "
                                                  "(interactive: offered from the models that fit this box)")
    sp.add_argument("--public-url", help="the public https:// address of this botd: prints each webhook URL")
