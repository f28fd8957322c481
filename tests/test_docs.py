"""The documentation and the deployment recipes, checked without booting anything.

- The docs site (mkdocs.yml, docs/): every English page has its Chinese pair (page.md /
  page.zh.md) with the same ## and ### sections in the same order (a heading naming a config
  section, e.g. `[server]`, names the same one in both); every config key in a page's tables
  (`| key | default | meaning |`) appears in its Chinese pair; every page is in the nav; the
  site builds with --strict (broken links and #anchors fail) and fetches nothing from the
  network; the security page keeps what an admin exposing botd must know.
- README.md and README.zh-CN.md stay short: what botd is, the two commands, where to read next.
- The Dockerfile, compose.yaml, environment.yml, .dockerignore and scripts/wheelhouse.sh
  parse, reference files that exist, and the image's config (config.toml as the Dockerfile
  and compose.yaml rewrite it) is a valid botd config; the image carries the built docs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml  # PyYAML: MkDocs needs it, so the test tools have it

from connectors.config import config_from_dict
from core.config import BotConfig

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ZH = ROOT / "README.zh-CN.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: Path) -> list[str]:
    """The lines outside fenced code blocks."""
    out, in_code = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            out.append(line)
    return out


def headings(path: Path) -> list[tuple[int, str]]:
    """(level, title) of every ## and ### heading, in order."""
    found = []
    for line in prose_lines(path):
        m = re.match(r"^(#{2,3}) (.+?)\s*$", line)
        if m:
            found.append((len(m.group(1)), m.group(2)))
    return found


def config_sections(title: str) -> list[str]:
    """The config sections a heading names, e.g. ["[server]"] or ["[wecom.<bot>]"]."""
    return re.findall(r"`(\[[^`]+\])`", title)


def table_keys(path: Path) -> dict[str, list[str]]:
    """Config keys documented in tables whose first column is "key", by the heading above them."""
    keys: dict[str, list[str]] = {}
    section, in_table = "", False
    for line in prose_lines(path):
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if re.match(r"^\|\s*key\s*\|", line):
            in_table = True
            continue
        if in_table and line.startswith("|"):
            m = re.match(r"^\|\s*`([^`]+)`", line)
            if m:
                keys.setdefault(section, []).append(m.group(1))
            continue
        in_table = False
    return keys


def english_pages() -> list[Path]:
    """docs/**/page.md, the English side of each pair."""
    pages = sorted(p for p in DOCS.rglob("*.md") if not p.name.endswith(".zh.md"))
    assert len(pages) >= 15, pages
    return pages


def chinese(page: Path) -> Path:
    return page.with_name(page.name[: -len(".md")] + ".zh.md")


def all_docs_text(suffix: str) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md"))
                     if p.name.endswith(".zh.md") == (suffix == ".zh.md"))


# -- the docs site ------------------------------------------------------------------------------


def test_every_page_has_a_chinese_pair_with_the_same_sections_in_the_same_order():
    for page in english_pages():
        if page.parent.name == "protocols":
            continue  # notes on a platform's wire protocol, beside its connector: not a topic page
        zh_page = chinese(page)
        assert zh_page.exists(), f"{page.relative_to(ROOT)} has no Chinese pair {zh_page.name}"
        if page.parent.name == "reference":
            continue  # generated from the config models, checked against them where it is generated
        en, zh = headings(page), headings(zh_page)
        name = page.relative_to(DOCS)
        for i, ((le, te), (lz, tz)) in enumerate(zip(en, zh, strict=False)):
            assert le == lz, f"{name}, heading {i + 1}: {'#' * le} {te!r} in English, {'#' * lz} {tz!r} in Chinese"
            assert config_sections(te) == config_sections(tz), (
                f"{name}, heading {i + 1}: {te!r} and {tz!r} name different config sections")
        assert len(en) == len(zh), (
            f"{name}: {len(en)} ## / ### headings in English, {len(zh)} in Chinese; first unmatched: "
            f"{(en[len(zh)] if len(en) > len(zh) else zh[len(en)])!r}")


def test_defaults_are_written_once_in_the_generated_reference():
    """Every key's default lives on its config model, and from there in the generated reference
    (docs/reference/, checked against the models by tests/test_config_reference.py). A topic page
    with its own `| key | default | ... |` table would be a second copy that nothing checks."""
    copies = [f"{page.relative_to(ROOT)}: {line[:60]}"
              for page in sorted(DOCS.rglob("*.md")) if page.parent.name not in ("reference", "protocols")
              for line in prose_lines(page)
              if re.match(r"^\|\s*(key|Key|配置项|键)\s*\|\s*(default|Default|默认值)\s*\|", line)]
    assert not copies, f"link to docs/reference/configuration.md instead: {copies}"
    reference = (DOCS / "reference" / "configuration.md").read_text(encoding="utf-8")
    assert sum(len(v) for v in table_keys(DOCS / "reference" / "configuration.md").values()) > 150 or \
        reference.count("\n| `") > 150, "the generated reference lists the keys"


def test_every_bot_key_is_documented():
    en, zh = all_docs_text(".md"), all_docs_text(".zh.md")
    for key in BotConfig.model_fields:
        names = (f"`{key}`", f"[[bots.NAME.{key}]]")  # a key or a sub-table of its own
        assert any(n in en for n in names), f"[bots.NAME] {key} is documented nowhere in docs/"
        assert any(n in zh for n in names), f"[bots.NAME] {key} is documented nowhere in the Chinese docs"
    assert re.search(r"^language = \"auto\"", (ROOT / "config.toml").read_text(encoding="utf-8"), re.M)


def test_the_chinese_docs_are_chinese_and_name_the_models_and_mirrors():
    zh, en = all_docs_text(".zh.md"), all_docs_text(".md")
    han = len(re.findall("[\u4e00-\u9fff]", zh))
    assert han > 20000, han
    for needed in ("ModelScope", "Qwen2.5-0.5B-Instruct", "Qwen2.5-7B-Instruct", "Qwen3", "GLM-4",
                   "pypi.tuna.tsinghua.edu.cn", "mirrors.aliyun.com", "PIP_INDEX_URL",
                   "--no-index --find-links", "scripts/wheelhouse.sh", "docker compose", "environment.yml"):
        assert needed in zh, needed
        assert needed in en, needed


def nav_pages(nav: object) -> list[str]:
    """Every page path named in mkdocs.yml's nav."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return []


def mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        """Reads mkdocs.yml's !!python/name tags (the slugify function) as plain text."""

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def test_every_page_is_in_the_nav_and_nothing_fetches_from_the_network():
    cfg = mkdocs_config()
    in_nav = set(nav_pages(cfg["nav"]))
    pages = {str(p.relative_to(DOCS)) for p in english_pages() if p.parent.name != "protocols"}
    assert cfg["not_in_nav"].split() == ["/protocols/"], cfg["not_in_nav"]
    assert pages - in_nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - in_nav)}"
    assert in_nav - pages == set(), f"nav entries without a page: {sorted(in_nav - pages)}"
    assert cfg["strict"] is True and cfg["theme"]["font"] is False, "Google fonts are fetched unless font: false"
    plugins = [next(iter(p)) if isinstance(p, dict) else p for p in cfg["plugins"]]
    assert "social" not in plugins and "privacy" not in plugins and "offline" not in plugins, plugins
    assert all(v == "warn" for v in cfg["validation"].values()), cfg["validation"]  # --strict fails on them
    i18n = next(p["i18n"] for p in cfg["plugins"] if isinstance(p, dict) and "i18n" in p)
    assert i18n["docs_structure"] == "suffix"
    assert {lang["locale"] for lang in i18n["languages"]} == {"en", "zh"}


def test_the_site_builds_strict_and_loads_nothing_from_another_host(tmp_path):
    """A broken link, a missing #anchor or a page outside the nav fails the build."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    # Not --quiet: it drops the warnings that --strict counts, and a broken build passes.
    res = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    site = tmp_path / "site"
    for page in english_pages():
        rel = page.relative_to(DOCS).with_suffix(".html")
        assert (site / rel).exists(), rel
        assert (site / "zh" / rel).exists(), f"zh/{rel}"
    loads = set()
    for html in site.rglob("*.html"):
        # What a browser loads by itself: scripts, stylesheets, images, fonts (links are clicks).
        loads |= set(re.findall(r"<(?:script|img|link)[^>]*?(?:src|href)=\"(https?:)?//([^\"/]+)",
                                html.read_text(encoding="utf-8")))
    assert not loads, f"the site loads from other hosts: {sorted(loads)}"
    assert "console-chat.png" in (site / "index.html").read_text(encoding="utf-8")


def test_the_files_the_docs_name_exist():
    """A page that names `bots/streaming.py` after it moved is wrong: every repository path the
    pages name (bots/, connectors/, core/, tests/, bench/, scripts/, systemd/) exists."""
    missing = set()
    for page in sorted(DOCS.rglob("*.md")):
        for m in re.finditer(r"(?<![\w./-])((?:bots|connectors|core|tests|bench|scripts|systemd)/[\w./<>-]*)",
                             page.read_text(encoding="utf-8")):
            path = m.group(1).rstrip(".")
            if "<" not in path and not (ROOT / path).exists():
                missing.add(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, sorted(missing)


def test_nested_lists_are_indented_by_four_spaces():
    """GitHub nests a list indented by 2 or 3 spaces; Python-Markdown (MkDocs) makes it part of the
    item's text. Every nested list marker in the docs is indented by a multiple of four."""
    shallow = [f"{page.relative_to(ROOT)}: {line.strip()[:60]}"
               for page in sorted(DOCS.rglob("*.md")) for line in prose_lines(page)
               if re.match(r"^( {1,3}| {5,7})([-*+]|\d+\.) ", line)]
    assert not shallow, shallow


def test_the_configuration_page_names_every_key_a_reload_cannot_change():
    from bots.daemon import _RESTART_ONLY

    for page in (DOCS / "configuration.md", DOCS / "configuration.zh.md"):
        text = page.read_text(encoding="utf-8")
        missing = [f"{s}.{k}" for s, keys in _RESTART_ONLY.items() for k in keys if f"`{s}.{k}`" not in text]
        assert not missing, f"{page.name} does not say that these need a restart: {missing}"


def test_the_security_page_lists_every_platforms_webhook_path_for_the_proxy():
    """A reverse proxy forwards the platforms' webhook paths only: the list an admin copies names
    every platform in the registry (a path is /<section>/..., e.g. /wecom/<bot>)."""
    from connectors import REGISTRY

    platforms = [e.section for name, e in REGISTRY.items() if name not in ("http_api", "web_console")]
    assert {"telegram", "slack", "wecom", "wecom_aibot"} <= set(platforms), platforms
    for page in (DOCS / "security.md", DOCS / "security.zh.md"):
        text = page.read_text(encoding="utf-8")
        nginx = re.search(r"```nginx\n(.*?)```", text, re.S)
        assert nginx, f"{page.name}: the proxy example"
        for section in platforms:
            assert f"`/{section}/" in text, f"{page.name}: add /{section}/... to the reverse proxy's paths"
            assert section in nginx.group(1), f"{page.name}: add {section} to the nginx example"


def test_getting_started_lists_every_command_of_the_cli():
    import argparse

    from bots.cli import _parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(actions[0].choices) if actions else {}

    commands = [f"botd {name}" + (f" {action}" if action else "")
                for name, sp in subcommands(_parser()).items() for action in (subcommands(sp) or [""])]
    assert "botd run" in commands and "botd kb ingest" in commands, commands
    for page in (DOCS / "getting-started.md", DOCS / "getting-started.zh.md"):
        text = page.read_text(encoding="utf-8")
        missing = [c for c in commands if f"`{c}`" not in text and f"`{c.rsplit(' ', 1)[-1]}`" not in text]
        assert not missing, f"{page.name}'s command table lacks {missing}"


def test_the_security_page_keeps_what_an_admin_exposing_botd_must_know():
    common = ("[api] keys", "anonymous_bots", "allowed_hosts", "/wecom_aibot/<bot>", "botd token revoke",
              "noeviction", "max_deliveries")
    for page, needed in ((DOCS / "security.md", (*common, "Reverse proxy")),
                         (DOCS / "security.zh.md", (*common, "反向代理"))):
        text = page.read_text(encoding="utf-8")
        for n in needed:
            assert n in text, f"{page.name} lost {n!r}"


# -- the READMEs --------------------------------------------------------------------------------


@pytest.mark.parametrize("readme", [README, README_ZH], ids=["en", "zh"])
def test_the_readme_is_short_and_names_the_two_commands_and_the_docs(readme):
    text = readme.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= 260, f"{readme.name} has {lines} lines: the details belong in docs/"
    for command in ("bash scripts/run.sh", "bash scripts/test.sh"):
        assert command in text, command
        assert (ROOT / command.split()[1]).exists(), command
    assert "mkdocs serve" in text and "mkdocs build" in text
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / link).exists(), f"{readme.name} links to {link}, which does not exist"
    assert re.search(r"!\[[^\]]*\]\(docs/[^)]+\.png\)", text), "a screenshot"


# -- deployment recipes -----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def image_config_text() -> str:
    """config.toml as the Dockerfile's sed expressions rewrite it for the image."""
    run = " ".join(args for ins, args in dockerfile_instructions() if ins == "RUN" and "sed " in args)
    exprs = re.findall(r"-e '([^']+)'", run)
    assert len(exprs) == 3, exprs
    text = (ROOT / "config.toml").read_text(encoding="utf-8")
    for e in exprs:
        m = re.fullmatch(r"s\|(.+?)\|(.*)\|", e)
        assert m, e
        # The brackets are escaped for sed's regex only.
        new = sed_substitute(text, m.group(1).replace(r"\[", "[").replace(r"\]", "]"), m.group(2))
        assert new != text, f"the Dockerfile's {e!r} changes nothing in config.toml"
        text = new
    return text


def sed_substitute(text: str, pattern: str, repl: str) -> str:
    """Apply one sed s||| expression (basic regex: ^, .*, literal rest) to every line."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith(".*", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "^" and i == 0:
            regex, i = regex + "^", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return "\n".join(re.sub(regex, lambda _m: repl, line, count=1) for line in text.split("\n"))


def test_the_dockerfile_is_multi_stage_non_root_with_a_volume_and_a_healthcheck():
    ins = dockerfile_instructions()
    names = [i for i, _ in ins]
    assert names.count("FROM") == 2 and any(" AS build" in a for i, a in ins if i == "FROM")
    last_stage = ins[max(k for k, (i, _) in enumerate(ins) if i == "FROM"):]
    users = [a for i, a in last_stage if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any("/var/lib/botd" in a for i, a in last_stage if i == "VOLUME")
    health = [a for i, a in last_stage if i == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    cmd = [a for i, a in last_stage if i == "CMD"]
    assert cmd and "botd" in cmd[-1] and "run" in cmd[-1]
    # Files the build copies from the context exist (and .dockerignore does not drop them).
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    assert ".venv" in ignored and "state" in ignored and ".git" in ignored
    for i, a in ins:
        if i == "COPY" and "--from" not in a:
            *sources, _dest = shlex.split(a)
            for src in sources:
                assert (ROOT / src).exists(), src
                assert src == "." or src not in ignored, src
    build = " ".join(a for i, a in ins if i == "RUN")
    for needed in ("pyproject.toml", "config.toml"):
        assert needed in build and (ROOT / needed).exists()
    assert re.search(r"torch==\[0-9.\]\*", build) and re.search(r"^\s*\"torch==[0-9.]+\"",
                                                               (ROOT / "pyproject.toml").read_text(), re.M)


def test_the_images_config_is_valid_and_needs_an_api_key(tmp_path, monkeypatch):
    text = image_config_text()
    data = tomllib.loads(text)
    assert data["server"]["host"] == "0.0.0.0" and data["server"]["state_dir"] == "/var/lib/botd"
    assert data["api"]["keys"] == ["env:BOTD_API_KEY"]
    monkeypatch.setenv("BOTD_API_KEY", "k" * 32)
    cfg = config_from_dict(data, tmp_path / "config.toml")
    assert cfg.server.host == "0.0.0.0"
    # compose.yaml's command points the same config at its redis service.
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    command = compose["services"]["botd"]["command"]
    m = re.search(r"sed '(s\|[^']+)'", command[-1])
    assert m, command
    _, pattern, repl, _ = m.group(1).split("|")
    redis_cfg = tomllib.loads(sed_substitute(text, pattern, repl))
    assert redis_cfg["redis"]["url"] == "redis://redis:6379/0"
    config_from_dict(redis_cfg, tmp_path / "config.toml")


def test_compose_has_botd_and_redis_and_builds_this_context():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"botd", "redis"} <= set(services)
    botd = services["botd"]
    assert (ROOT / botd["build"]["context"] / "Dockerfile").exists()
    assert botd["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(v).endswith(":/var/lib/botd") for v in botd["volumes"])
    assert set(compose["volumes"]) >= {"botd-data", "redis-data"}


def test_the_conda_environment_installs_this_checkout_with_the_cpu_torch():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert "-e ." in pip
    # torch only comes with the sentence-transformers extra; pip looks for it in the CPU index.
    pin = re.search(r"\"(torch==[0-9.]+)\"", (ROOT / "pyproject.toml").read_text()).group(1)
    assert not any(p.startswith("torch") and p != pin for p in pip) and any("whl/cpu" in p for p in pip)


def test_the_wheelhouse_script_parses_and_is_executable():
    script = ROOT / "scripts" / "wheelhouse.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "pip\" wheel" in text or "pip wheel" in text
    assert "unset SOURCE_DATE_EPOCH" in text


def test_the_image_builds_the_docs_site_and_ships_only_the_html():
    ins = dockerfile_instructions()
    first_from = [k for k, (i, _) in enumerate(ins) if i == "FROM"]
    build_stage, last_stage = ins[first_from[0]:first_from[1]], ins[first_from[1]:]
    docs_run = [a for i, a in build_stage if i == "RUN" and "mkdocs build" in a]
    assert docs_run and "--strict" in docs_run[0] and "--site-dir /opt/botd/docs" in docs_run[0]
    assert "--quiet" not in docs_run[0] and " -q " not in docs_run[0], "--quiet hides what --strict counts"
    # The versions come from pyproject.toml's docs extra, from the wheelhouse when there is one.
    pins = re.findall(r'"(mkdocs[a-z0-9-]*==[0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert {p.split("==")[0] for p in pins} == {"mkdocs", "mkdocs-material", "mkdocs-static-i18n"}, pins
    assert "--no-index --find-links wheelhouse" in docs_run[0]
    assert '"[docs]"' in (ROOT / "scripts" / "wheelhouse.sh").read_text()
    assert ("COPY", "--from=build /opt/botd/docs /opt/botd/docs") in last_stage
    assert not any("mkdocs" in a for i, a in last_stage if i == "RUN"), "MkDocs stays in the build stage"
