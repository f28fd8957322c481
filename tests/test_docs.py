"""The documentation and the deployment recipes, checked without building anything (fast).

- README.zh-CN.md keeps in step with README.md: the same ## and ### sections in the same
  order (a heading naming a config section, e.g. `[server]`, names the same one in both), and
  every config key in README's tables (`| key | default | meaning |`) appears in the Chinese
  README too. Every [bots.NAME] key of the config model is documented.
- The Dockerfile, compose.yaml, environment.yml, .dockerignore and scripts/wheelhouse.sh
  parse, reference files that exist, and the image's config (config.toml as the Dockerfile
  and compose.yaml rewrite it) is a valid botd config.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from core.config import BotConfig, config_from_dict

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ZH = ROOT / "README.zh-CN.md"
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


def test_both_readmes_have_the_same_sections_in_the_same_order():
    en, zh = headings(README), headings(README_ZH)
    pairs = list(zip(en, zh, strict=False))
    for i, ((le, te), (lz, tz)) in enumerate(pairs):
        assert le == lz, f"heading {i + 1}: README.md has {'#' * le} {te!r}, README.zh-CN.md has {'#' * lz} {tz!r}"
        assert config_sections(te) == config_sections(tz), (
            f"heading {i + 1}: {te!r} and {tz!r} name different config sections")
    assert len(en) == len(zh), (
        f"README.md has {len(en)} ## / ### headings, README.zh-CN.md {len(zh)}; first unmatched: "
        f"{(en[len(zh)] if len(en) > len(zh) else zh[len(en)])!r}")


def test_every_documented_config_key_is_in_the_chinese_readme():
    zh = README_ZH.read_text(encoding="utf-8")
    keys = table_keys(README)
    assert sum(len(v) for v in keys.values()) > 100, keys  # the parser found the tables
    missing = [(section, k) for section, ks in keys.items() for k in ks if f"`{k}`" not in zh]
    assert not missing, f"config keys documented in README.md but not in README.zh-CN.md: {missing}"


def test_every_bot_key_is_documented():
    documented = next(v for section, v in table_keys(README).items() if "[bots.NAME]" in section)
    assert set(BotConfig.model_fields) <= set(documented), set(BotConfig.model_fields) - set(documented)
    assert "language" in documented
    assert re.search(r"^language = \"auto\"", (ROOT / "config.toml").read_text(encoding="utf-8"), re.M)


def test_the_chinese_readme_is_chinese_and_names_the_models_and_mirrors():
    zh = README_ZH.read_text(encoding="utf-8")
    han = len(re.findall("[\u4e00-\u9fff]", zh))
    assert han > 5000, han
    for needed in ("ModelScope", "Qwen2.5-0.5B-Instruct", "Qwen2.5-7B-Instruct", "Qwen3", "GLM-4",
                   "pypi.tuna.tsinghua.edu.cn", "mirrors.aliyun.com", "PIP_INDEX_URL",
                   "--no-index --find-links", "scripts/wheelhouse.sh", "docker compose", "environment.yml"):
        assert needed in zh, needed
        assert needed in README.read_text(encoding="utf-8"), needed


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
