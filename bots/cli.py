"""The ``botd`` command: ``run``, ``check-config``, ``chat``, ``kb``, ``telegram``, ``console`` and ``token``
(``issue``, ``revoke``).

Every failure an admin can cause (bad config, missing model, busy port) ends in one
readable line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

# Nothing at run time may reach a model hub; set before any ML library is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from connectors.config import load_config
from connectors.http_api.config import ApiConfig
from connectors.signing import SigningKeySection
from connectors.telegram.config import TelegramConfig
from core.config import DEFAULT_CONFIG_PATH, Config, ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="botd", description="A local LLM behind chat platforms and an HTTP API.")
    p.add_argument("--version", action="version", version=f"botd {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", type=Path, default=DEFAULT_CONFIG_PATH,
                        help="path to config.toml (default: ./config.toml)")
        return sp

    with_config(sub.add_parser("run", help="run the daemon"))
    with_config(sub.add_parser("check-config", help="validate the config file and exit 0 (ok) or 1"))
    chat = with_config(sub.add_parser("chat", help="talk to a bot in this terminal"))
    chat.add_argument("--bot", help="which bot (default: [api] default_bot)")
    chat.add_argument("--conversation", default="default", help="conversation name (separate histories)")
    kb = sub.add_parser("kb", help="knowledge bases: ingest documents, try a search")
    kb_sub = kb.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = with_config(kb_sub.add_parser("ingest", help="(re)build knowledge bases from their folders"))
    sp.add_argument("name", nargs="?", help="one knowledge base ([knowledge.NAME]); default: all")
    sp = with_config(kb_sub.add_parser("search", help="show what a bot would retrieve for a question"))
    sp.add_argument("bot", help="the bot whose grants are searched")
    sp.add_argument("question")
    tg = sub.add_parser("telegram", help="Telegram webhook registration")
    tg_sub = tg.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("set-webhook", "register [telegram.BOT] webhook_url with Telegram"),
                         ("delete-webhook", "remove the webhook (for long polling)")):
        sp = with_config(tg_sub.add_parser(action, help=text))
        sp.add_argument("bot", help="the bot's name ([telegram.BOT] in config.toml)")
    console = sub.add_parser("console", help="web console users")
    console_sub = console.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = console_sub.add_parser("passwd", help="hash a password and print the [console.users.NAME] section")
    sp.add_argument("name", help="the user's login name")
    sp.add_argument("--role", choices=["admin", "department", "viewer"], default="department",
                    help="admin: everything; department: only --bots; viewer: reads only (default: department)")
    sp.add_argument("--bots", default="", help="comma-separated bots the user may see (department, viewer)")
    sp.add_argument("--stdin", action="store_true", help="read the password from the first line of stdin")
    token = sub.add_parser("token", help="JWT bearer tokens for the HTTP API")
    token_sub = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = with_config(token_sub.add_parser("issue", help="print a token that may use the given bots"))
    sp.add_argument("--bots", required=True, help="comma-separated bots the token may use, e.g. hr")
    sp.add_argument("--user", required=True, help="who the token is for (its conversations are its own)")
    sp.add_argument("--ttl", default="7d", help="lifetime: e.g. 3600, 90m, 12h, 7d (default 7d, at most 365d)")
    sp = with_config(token_sub.add_parser("revoke", help="end one API token now (the running daemon refuses it)"))
    sp.add_argument("token", help="the token, or - to read it from the first line of stdin")
    from bots import model_pull

    model_pull.add_parser(sub, with_config)
    from bots import doctor

    doctor.add_parser(sub, with_config)
    from bots import init_wizard

    init_wizard.add_parser(sub, with_config)
    from bots import eval as evaluation

    evaluation.add_parser(sub, with_config)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("botd")
    except Exception:
        return "dev"


def _fail(message: str) -> int:
    print(f"botd: {message}", file=sys.stderr)
    return 1


def _secrets_used(args: argparse.Namespace) -> bool | tuple[str, ...]:
    """The secrets a command uses (all, none, or those under some keys): only these must be set.

    ``kb ingest`` run by hand must not need the chat platforms' tokens, for example.
    """
    if args.command == "kb":
        return False
    if args.command in ("chat", "eval"):
        return ("redis",)
    if args.command == "telegram":
        return (f"telegram.{args.bot}",)
    if args.command == "token":
        return ("console.signing_key", "redis") if args.action == "revoke" else ("console.signing_key",)
    return True  # run, check-config


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "console":  # needs no config: it prints a section to paste into one
        return _console_passwd(args)
    if args.command == "model":  # works before there is a config (reads one if it is there)
        from bots import model_pull

        return model_pull.main(args)
    if args.command == "doctor":  # reports a config it cannot load as one of its checks
        from bots import doctor

        return doctor.main(args)
    if args.command == "init":  # writes the config
        from bots import init_wizard

        return init_wizard.run(args)
    try:
        cfg = load_config(args.config, check_secrets=_secrets_used(args))
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    if args.command == "check-config":
        from bots.daemon import model_source

        print(f"{args.config}: ok (model {model_source(cfg)}, {len(cfg.bots)} bot(s), "
              f"{len(cfg.knowledge)} knowledge base(s))")
        return 0
    if args.command == "run":
        return _run(cfg)
    if args.command == "chat":
        return _chat(cfg, args.bot, args.conversation)
    if args.command == "kb":
        return _kb(cfg, args)
    if args.command == "telegram":
        return _telegram(cfg, args.action, args.bot)
    if args.command == "token":
        return _token_revoke(cfg, args) if args.action == "revoke" else _token_issue(cfg, args)
    if args.command == "eval":
        from bots import eval as evaluation

        return evaluation.main(cfg, args)
    return 2


def _console_passwd(args: argparse.Namespace) -> int:
    import getpass
    import re

    from core.auth import hash_password

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.name):
        return _fail(f"user name {args.name!r}: use 1-64 letters, digits, '.', '-' and '_'")
    bots = [b.strip() for b in args.bots.split(",") if b.strip()]
    if args.role == "admin" and bots:
        return _fail("an admin sees every bot: leave out --bots (or use --role viewer)")
    if args.role == "department" and not bots:
        return _fail("a department user needs --bots (the bots it may see), e.g. --bots hr")
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        try:
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                return _fail("the two passwords differ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return _fail("no password given")
    if len(password) < 8:
        return _fail("a password needs at least 8 characters")
    print(f"[console.users.{args.name}]")
    print(f'password_hash = "{hash_password(password)}"')
    print(f'role = "{args.role}"')
    if bots:
        print("bots = [" + ", ".join(f'"{b}"' for b in bots) + "]")
    print("# paste the lines above into config.toml, then: systemctl reload botd", file=sys.stderr)
    return 0


def parse_ttl(text: str) -> int:
    """Seconds in "3600", "3600s", "90m", "12h" or "7d"; ValueError otherwise."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 3600, 90m, 12h, 7d)")
    seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 60 <= seconds <= 365 * 86400:
        raise ValueError(f"{text!r}: a token lives between 1 minute and 365 days")
    return seconds


def _token_issue(cfg: Config, args: argparse.Namespace) -> int:
    import re

    from core.auth import API_AUDIENCE, Tokens
    from core.secrets import resolve_secret

    signing_key = SigningKeySection.of(cfg).signing_key
    api_bots = ApiConfig.of(cfg).bots
    if signing_key is None:
        return _fail('no [console] signing_key to sign with; set one, e.g. signing_key = "env:BOTD_CONSOLE_KEY"')
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.user):
        return _fail(f"--user {args.user!r}: use 1-64 letters, digits, '.', '-' and '_'")
    bots = [b.strip() for b in args.bots.split(",") if b.strip()]
    if not bots:
        return _fail("--bots: name at least one bot")
    for b in bots:
        if b not in cfg.bots:
            return _fail(f"--bots: no bot named {b!r}; bots: {', '.join(sorted(cfg.bots))}")
        if api_bots and b not in api_bots:
            return _fail(f"--bots: {b!r} is not served by the HTTP API ([api] bots: {', '.join(api_bots)})")
    try:
        ttl = parse_ttl(args.ttl)
    except ValueError as exc:
        return _fail(f"--ttl: {exc}")
    token = Tokens(resolve_secret(signing_key)).issue(args.user, API_AUDIENCE, ttl, bots=bots)
    print(token)
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + ttl))
    print(f"# for {args.user}, bots {', '.join(bots)}, valid until {expires}; "
          "send it as: Authorization: Bearer <token>", file=sys.stderr)
    return 0


def _token_revoke(cfg: Config, args: argparse.Namespace) -> int:
    """Put a token's id on the deny-list in Redis (the one the daemon uses) until it expires."""
    from core.auth import API_AUDIENCE, AuthError, DenyList, Tokens
    from core.kv import KeyValueCache
    from core.redis_store import RedisManager, StoreUnavailable
    from core.secrets import resolve_secret

    signing_key = SigningKeySection.of(cfg).signing_key
    if signing_key is None:
        return _fail("no [console] signing_key: there are no API tokens to revoke")
    token = (sys.stdin.readline() if args.token == "-" else args.token).strip()
    try:
        # Checked with the current key: a token signed with an earlier key already stopped
        # working at the reload that brought the new key.
        claims = Tokens(resolve_secret(signing_key)).decode(token, API_AUDIENCE)
    except AuthError as exc:
        return _fail(f"not revoked: {exc.reason} (an expired token, or one signed with another key, "
                     "is refused already)")

    async def revoke() -> None:
        redis = RedisManager(cfg.redis, cfg.server.state_dir)
        await redis.start()
        try:
            await DenyList(KeyValueCache(redis, cfg.redis.key_prefix)).revoke(claims["jti"], int(claims["exp"]))
        finally:
            await redis.close()

    try:
        asyncio.run(revoke())
    except StoreUnavailable as exc:
        return _fail(f"not revoked: redis is unreachable ({exc})")
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(int(claims["exp"])))
    print(f"revoked the token of {claims['sub']} (id {claims['jti']}, would have expired {expires})")
    return 0


def _telegram(cfg: Config, action: str, bot: str) -> int:
    from telegram.error import TelegramError

    from connectors.telegram.connector import delete_webhook, set_webhook

    sections = TelegramConfig.sections(cfg)
    tg = sections.get(bot)
    if tg is None:
        known = ", ".join(sorted(sections)) or "none"
        return _fail(f"no [telegram.{bot}] section in the config; sections: {known}")
    try:
        result = asyncio.run(set_webhook(tg) if action == "set-webhook" else delete_webhook(tg))
    except ValueError as exc:
        return _fail(f"telegram.{bot}: {exc}")
    except TelegramError as exc:
        return _fail(f"telegram.{bot}: Telegram refused: {exc}")
    print(result)
    return 0


def _kb(cfg: Config, args: argparse.Namespace) -> int:
    from core.knowledge.embedder import Embedder, EmbeddingError
    from core.logging import configure

    configure(cfg.server.log_level, cfg.server.log_format)
    embedder = Embedder(cfg.embeddings.model, cfg.embeddings.batch_size, cfg.embeddings.languages)
    try:
        if args.action == "ingest":
            from core.knowledge.guards import ParseLimits
            from core.knowledge.ingest import ingest

            names = [args.name] if args.name else sorted(cfg.knowledge)
            if args.name and args.name not in cfg.knowledge:
                known = ", ".join(sorted(cfg.knowledge)) or "none"
                return _fail(f"no [knowledge.{args.name}] in the config; knowledge bases: {known}")
            if not names:
                return _fail("no knowledge bases configured; add a [knowledge.NAME] section with paths")
            # Loaded once, up front and timed apart: each base's rate is its own work.
            started = time.monotonic()
            embedder.load()
            print(f"embedding model loaded in {time.monotonic() - started:.1f} s ({embedder.name})")
            for name in names:
                kb = cfg.knowledge[name]
                from bots.ingest_progress import DocumentsBar

                documents = DocumentsBar(name, [Path(p) for p in kb.paths])
                try:
                    report = ingest(name, [Path(p) for p in kb.paths], cfg.server.state_dir, embedder,
                                    kb.chunk_chars, on_file=documents, limits=ParseLimits.from_config(cfg.ingest))
                finally:
                    documents.close()
                print(report.summary())
                for source, reason in report.skipped:
                    print(f"  skipped {source}: {reason}")
            return 0
        from core.knowledge.retriever import Retriever

        bot = cfg.bots.get(args.bot)
        if bot is None:
            return _fail(f"no bot named {args.bot!r}; bots: {', '.join(sorted(cfg.bots))}")
        retriever = Retriever.from_config(cfg, embedder)
        retriever.refresh(bot.knowledge)
        hits = retriever.search(bot.knowledge, args.question)
        if not hits:
            print(f"nothing relevant in {', '.join(bot.knowledge) or 'no knowledge base'}")
        for h in hits:
            cosine = "n/a" if h.similarity is None else f"{h.similarity:.2f}"  # None: a language the model cannot judge
            print(f"[{h.kb}] {h.cite}  (fused {h.score:.4f}, cosine {cosine}, terms {h.coverage:.0%})")
            print(f"    {h.text[:200]}")
        return 0
    except EmbeddingError as exc:
        return _fail(str(exc))


def _run(cfg: Config) -> int:
    import signal

    # A stop or reload asked for before the daemon's event loop takes the signals over is noted
    # (by default SIGTERM and SIGHUP would kill it half-started; as a container's PID 1, ignored).
    asked: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: asked.append(signum))

    from bots.daemon import Daemon, StartupError
    from core.logging import configure

    configure(cfg.server.log_level, cfg.server.log_format)
    try:
        asyncio.run(Daemon(cfg).run_forever(asked))
    except StartupError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        pass
    return 0


def _chat(cfg: Config, bot: str | None, conversation: str) -> int:
    from bots.service import ChatService
    from connectors.console import ConsoleConnector
    from core.config import Settings
    from core.engines import EngineError
    from core.logging import configure
    from core.runtime import Runtime

    bot = bot or ApiConfig.of(cfg).default_bot
    if bot not in cfg.bots:
        return _fail(f"no bot named {bot!r}; bots: {', '.join(sorted(cfg.bots))}")
    configure("warning", "console" if sys.stderr.isatty() else "json")

    async def session() -> None:
        settings = Settings(cfg)
        async with Runtime(settings) as runtime:
            service = ChatService(settings, runtime)
            await ConsoleConnector(service, settings, runtime.cache, bot, conversation=conversation).run()

    try:
        asyncio.run(session())
    except EngineError as exc:
        from bots.daemon import model_error

        return _fail(model_error(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
