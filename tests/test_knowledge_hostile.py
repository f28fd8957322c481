"""Knowledge bases under attack: documents built to exhaust the machine (a .docx that unpacks to
half a gigabyte, a part that expands a thousandfold, a parser run out of memory, a heading that
makes a regular expression backtrack, a file that never ends), and folders that would hand one
department's documents to another. Real documents (python-docx, fpdf2), the real ingest with its
parsing process, the real embedder, the real daemon and console over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import docx
import pytest

from connectors.config import load_config
from core.config import ConfigError
from core.knowledge.documents import UnreadableDocument, read_document
from core.knowledge.embedder import Embedder
from core.knowledge.guards import MB, ParseLimits
from core.knowledge.ingest import ingest
from core.knowledge.retriever import Retriever
from core.knowledge.store import KnowledgeStore
from core.messages import InboundMessage
from tests.helpers import BOTD, make_config, running_daemon, wait_for
from tests.test_knowledge import HR_QUESTION, kb_config, retriever_for, write_corpus, write_pdf

CORPUS = {"leave.md", "benefits.txt", "remote-work.pdf", "onboarding.docx", "年假.md", "差旅.docx"}


# -- hostile documents, built as an attacker would ------------------------------------------------


def docx_bomb(path: Path, megabytes: int) -> Path:
    """A real .docx (python-docx) whose word/document.xml is rewritten to ``megabytes`` MB of empty
    paragraphs, streamed through deflate (which packs them ~700x): never held in memory here."""
    seed = path.with_suffix(".seed.docx")
    d = docx.Document()
    d.add_paragraph("Quarterly figures.")
    d.save(str(seed))
    block = b"<w:p/>" * (MB // 6)
    with zipfile.ZipFile(seed) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        head, tail = src.read("word/document.xml").decode().split("<w:body>", 1)
        for info in src.infolist():
            if info.filename != "word/document.xml":
                out.writestr(info, src.read(info.filename))
        with out.open("word/document.xml", "w", force_zip64=True) as part:
            part.write((head + "<w:body>").encode())
            for _ in range(megabytes):
                part.write(block)
            part.write(tail.encode())
    seed.unlink()
    return path


def declare_size(path: Path, part: str, size: int) -> None:
    """Make the zip's central directory claim ``part`` unpacks to ``size`` bytes (its data unchanged)."""
    data = bytearray(path.read_bytes())
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_len] == part.encode():
            data[at + 24:at + 28] = size.to_bytes(4, "little")
            path.write_bytes(bytes(data))
            return
        at += 4
    raise AssertionError(f"no {part} in {path}")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """Under 1 MB (the console's upload limit), over 500 MB unpacked: built once (~3 s)."""
    path = docx_bomb(tmp_path_factory.mktemp("bomb") / "bomb.docx", 500)
    assert path.stat().st_size < 1_048_576
    return path


def rss_mb() -> float:
    return _status("VmRSS") / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def peak_mb() -> float:
    return _status("VmHWM") / 1024


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _alive(pid: int) -> bool:
    try:  # a zombie waiting for its reaper is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _sources(cfg, name: str) -> set[str]:
    return set(retriever_for(cfg).sources(name))


# -- item 6: what reading one document may cost -----------------------------------------------------


def test_a_1_mb_docx_that_unpacks_to_500_mb_is_refused_from_its_directory_and_the_base_ingested(tmp_path, bomb):
    hr, fin = write_corpus(tmp_path / "docs")
    (hr / "bomb.docx").write_bytes(bomb.read_bytes())
    cfg = kb_config(tmp_path, "", hr, fin)
    embedder = Embedder()
    embedder.load()
    before = rss_mb()
    reset_peak()
    started = time.monotonic()
    report = ingest("hr", [hr], cfg.server.state_dir, embedder, 800)
    # Refused from the zip's directory: nothing was unpacked, in this process or another.
    assert [s for s, _ in report.skipped] == ["bomb.docx"], report.skipped
    reason = report.skipped[0][1]
    assert "unpacks to 500 MB" in reason and "max_uncompressed_mb" in reason, reason
    assert peak_mb() - before < 150, (before, peak_mb())
    assert time.monotonic() - started < 60
    # The rest of the base is ingested and answers.
    assert _sources(cfg, "hr") == CORPUS
    assert retriever_for(cfg).search(["hr"], HR_QUESTION)[0].source == "leave.md"


def test_a_docx_part_that_expands_a_thousandfold_is_refused_by_its_ratio(tmp_path):
    # 20 MB of empty paragraphs: under the 200 MB total, but ~700x its packed size.
    path = docx_bomb(tmp_path / "dense.docx", 20)
    with pytest.raises(UnreadableDocument, match=r"word/document\.xml.*expands \d+ times.*max_ratio"):
        read_document(path)


def test_the_archive_check_believes_the_directory_and_unpacks_nothing(tmp_path):
    # A small, valid document whose directory claims 600 MB: only the directory can say so.
    path = tmp_path / "claims.docx"
    d = docx.Document()
    d.add_paragraph("Small.")
    d.save(str(path))
    declare_size(path, "word/document.xml", 600 * MB)
    with pytest.raises(UnreadableDocument, match="unpacks to 600 MB"):
        read_document(path)
    # An honest normal document passes every check.
    normal = tmp_path / "normal.docx"
    d.save(str(normal))
    assert read_document(normal)[0].text == "Small."


def test_pages_and_text_are_counted_before_they_cost(tmp_path):
    pdf = tmp_path / "long.pdf"
    write_pdf(pdf, "Long", ["A line of the report. " * 40] * 60)  # several pages
    with pytest.raises(UnreadableDocument, match=r"\d+ pages; the most is 2 \(\[ingest\] max_pages\)"):
        read_document(pdf, ParseLimits(max_pages=2))
    text = tmp_path / "big.txt"
    text.write_text("Lorem ipsum dolor sit amet. " * 80_000)  # 2.2 MB
    with pytest.raises(UnreadableDocument, match="max_text_mb"):
        read_document(text, ParseLimits(max_text_bytes=MB))
    wordy = tmp_path / "wordy.docx"
    d = docx.Document()
    words = "leave salary invoice budget travel expense laptop pension contract bonus parking canteen".split()
    for i in range(3000):  # varied text: it packs like a real memo (~5x), not like a bomb
        d.add_paragraph(" ".join(words[(i * 7 + j * j) % len(words)] + str(i * j % 97) for j in range(60)))
    d.save(str(wordy))
    with pytest.raises(UnreadableDocument, match=r"more than 1\.0 MB of text"):
        read_document(wordy, ParseLimits(max_text_bytes=MB))
    assert read_document(wordy)  # within the default limits


def test_a_document_that_outgrows_the_memory_ceiling_is_skipped_and_the_next_ones_read(tmp_path):
    hr, _ = write_corpus(tmp_path / "docs")
    # First in the folder's order: the documents after it need a fresh reading process.
    docx_bomb(hr / "a-huge.docx", 40)
    limits = ParseLimits(max_uncompressed_bytes=1000 * MB, max_ratio=1_000_000, memory_bytes=256 * MB)
    embedder = Embedder()
    embedder.load()
    before = rss_mb()
    reset_peak()
    report = ingest("hr", [hr], tmp_path / "state", embedder, 800, limits=limits)
    assert [s for s, _ in report.skipped] == ["a-huge.docx"], report.skipped
    assert "needs more than 256 MB of memory" in report.skipped[0][1], report.skipped
    assert peak_mb() - before < 150, (before, peak_mb())  # it grew in the child, not here
    assert set(KnowledgeStore(tmp_path / "state", "hr").load().manifest.files) == CORPUS


def test_a_heading_of_many_spaces_is_read_in_linear_time(tmp_path):
    # "# a", 2,000 spaces, "x": 11 s of regex backtracking (cubic), holding the GIL, before the fix.
    doc = tmp_path / "spaces.md"
    doc.write_text("# a" + " " * 2000 + "x\n\ntext\n\n## b" + " " * 200_000 + "y #\n\nmore\n")
    started = time.monotonic()
    sections = read_document(doc)
    assert time.monotonic() - started < 1.0
    assert [s.heading for s in sections] == ["a" + " " * 2000 + "x", "a" + " " * 2000 + "x > b" + " " * 200_000 + "y"]


def test_a_document_that_never_ends_is_skipped_after_the_time_limit_and_a_stop_ends_its_process(tmp_path):
    from core.knowledge.parse_worker import Interrupted, ParseWorker

    endless = tmp_path / "endless.txt"
    os.mkfifo(endless)  # reading it blocks for ever: no writer comes
    ok = tmp_path / "ok.md"
    ok.write_text("# Fine\n\nA normal document.\n")
    with ParseWorker(ParseLimits(timeout_s=1)) as worker:
        started = time.monotonic()
        with pytest.raises(UnreadableDocument, match=r"longer than 1 s \(\[ingest\] parse_timeout_s\)"):
            worker.read(endless)
        assert time.monotonic() - started < 5
        assert worker.read(ok)[0].heading == "Fine"  # a fresh process reads the next one
        pid = worker._proc.pid if worker._proc else 0
        stop_at = time.monotonic() + 0.5
        with pytest.raises(Interrupted):
            worker.read(endless, should_stop=lambda: time.monotonic() > stop_at)
        assert worker._proc is None and not Path(f"/proc/{pid}").exists()
        assert worker.started == 2


def test_a_parsing_process_never_outlives_the_process_that_started_it(tmp_path):
    import signal
    import sys

    endless = tmp_path / "endless.txt"
    os.mkfifo(endless)
    script = ("import sys, threading, time\n"
              "from pathlib import Path\n"
              "from core.knowledge.parse_worker import ParseWorker\n"
              "w = ParseWorker()\n"
              "threading.Thread(target=w.read, args=(Path(sys.argv[1]),), daemon=True).start()\n"
              "while w._proc is None: time.sleep(0.01)\n"
              "print(w._proc.pid, flush=True)\n"
              "time.sleep(600)\n")
    ingesting = subprocess.Popen([sys.executable, "-c", script, str(endless)], stdout=subprocess.PIPE, text=True)
    try:
        assert ingesting.stdout is not None
        child = int(ingesting.stdout.readline())
        assert Path(f"/proc/{child}").exists()
        ingesting.send_signal(signal.SIGKILL)  # the daemon dies mid-ingest
        ingesting.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the parsing process outlived the daemon"
    finally:
        if ingesting.poll() is None:
            ingesting.kill()


def test_kb_ingest_applies_the_ingest_section_of_the_config(tmp_path, bomb):
    hr, fin = write_corpus(tmp_path / "docs")
    (hr / "bomb.docx").write_bytes(bomb.read_bytes())
    write_pdf(hr / "long.pdf", "Long", ["A line of the report. " * 40] * 60)
    toml = tmp_path / "kb.toml"
    toml.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n\n[ingest]\nmax_pages = 2\n\n'
                    f'[knowledge.hr]\npaths = ["{hr}"]\n\n[bots.hr]\nknowledge = ["hr"]\n\n'
                    '[api]\ndefault_bot = "hr"\n')
    done = subprocess.run([BOTD, "kb", "ingest", "hr", "--config", str(toml)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "skipped bomb.docx: unpacks to 500 MB" in done.stdout, done.stdout
    assert "skipped long.pdf: " in done.stdout and "pages; the most is 2 ([ingest] max_pages)" in done.stdout
    # One log line each, naming the file.
    skipped = [json.loads(x) for x in done.stderr.splitlines() if '"document skipped' in x]
    assert sorted(Path(e["file"]).name for e in skipped) == ["bomb.docx", "long.pdf"], done.stderr
    assert set(KnowledgeStore(tmp_path / "state", "hr").load().manifest.files) == CORPUS


async def test_a_docx_bomb_uploaded_in_the_console_is_skipped_and_reported(tmp_path, redis_server, bomb,
                                                                           monkeypatch):
    from tests.test_console import KEY, browsers, console_config
    from tests.test_console_endpoints import _ingested, _upload

    monkeypatch.setenv("BOTD_TEST_CONSOLE_KEY", KEY)
    cfg = console_config(tmp_path, redis_server.url, knowledge=True)
    async with running_daemon(cfg) as api, browsers(api, "alice") as (alice,):
        retriever = api.daemon.runtime.retriever

        async def ready() -> bool:
            return retriever.has_index("hr")

        await wait_for(ready, timeout=90)
        before = rss_mb()
        reset_peak()
        status, body = await _upload(alice, "hr", "figures.docx", bomb.read_bytes())
        assert status == 201 and body["reingest"] is True, body
        await _ingested(alice, "hr")
        status, body = await alice.get("/api/knowledge")
        hr = next(k for k in body["knowledge"] if k["name"] == "hr")
        assert [s for s, _ in hr["progress"]["skipped"]] == ["figures.docx"], hr["progress"]
        assert "unpacks to 500 MB" in hr["progress"]["skipped"][0][1]
        assert [d["source"] for d in hr["documents"]] == ["hr-policy.md"]
        assert peak_mb() - before < 150, (before, peak_mb())
        status, body = await alice.get("/api/knowledge/search", params={"q": "parental leave bonus", "kb": "hr"})
        assert status == 200 and body["hits"][0]["source"] == "hr-policy.md"


# -- item 8: a department's folder is its own ---------------------------------------------------------


def test_overlapping_folders_of_department_bases_are_a_config_error(tmp_path):
    docs = tmp_path / "docs"
    for sub in ("hr", "finance", "hr2", "handbook"):
        (docs / sub).mkdir(parents=True)
    link = tmp_path / "payroll"
    link.symlink_to(docs / "finance")

    def config(**bases):
        return make_config(tmp_path, knowledge=bases,
                           bots={n: {"knowledge": [n]} for n in bases if not bases[n].get("shared")}
                           | {"assistant": {}})

    cases = [
        ({"hr": {"paths": [str(docs)]}, "finance": {"paths": [str(docs / "finance")]}},
         ("knowledge.hr.paths", "knowledge.finance.paths", repr(str(docs)), repr(str(docs / "finance")))),
        # A symlink to another department's folder is that folder.
        ({"hr": {"paths": [str(docs / "hr")]}, "finance": {"paths": [str(docs / "finance")]},
          "payroll": {"paths": [str(link)]}},
         ("knowledge.finance.paths", "knowledge.payroll.paths", repr(str(link)), repr(str(docs / "finance")))),
        # A shared base may not take in a department's folder (every bot would read it).
        ({"handbook": {"paths": [str(docs)], "shared": True}, "finance": {"paths": [str(docs / "finance")]}},
         ("knowledge.handbook.paths", "knowledge.finance.paths")),
        # The same folder twice, written differently.
        ({"hr": {"paths": [str(docs / "hr")]}, "finance": {"paths": [str(docs / "finance" / ".." / "hr")]}},
         ("knowledge.hr.paths", "knowledge.finance.paths")),
    ]
    for bases, named in cases:
        with pytest.raises(ConfigError) as err:
            config(**bases)
        assert all(n in str(err.value) for n in named), (str(err.value), named)
    # Neighbours that only share a prefix, and two shared bases, are fine.
    config(hr={"paths": [str(docs / "hr")]}, hr2={"paths": [str(docs / "hr2")]})
    config(handbook={"paths": [str(docs)], "shared": True}, policies={"paths": [str(docs / "hr")], "shared": True})


def test_an_index_built_from_other_folders_is_never_served(tmp_path):
    hr, fin = write_corpus(tmp_path / "docs")
    cfg = kb_config(tmp_path, "", hr, fin)
    ingest("hr", [hr], cfg.server.state_dir, Embedder(), 800)
    # The base "hr" is re-created for other documents (its old index still on disk).
    other = tmp_path / "docs" / "people"
    other.mkdir()
    (other / "canteen.md").write_text("# Canteen\n\nLunch is served from noon to two.\n")
    cfg2 = make_config(tmp_path, knowledge={"hr": {"paths": [str(other)], "schedule": ""}},
                       bots={"hr": {"knowledge": ["hr"]}}, api={"default_bot": "hr"})
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        r = Retriever.from_config(cfg2, Embedder())
        r.refresh(["hr"])
    assert not r.has_index("hr") and r.search(["hr"], HR_QUESTION) == []
    assert KnowledgeStore(cfg.server.state_dir, "hr").built_from() == [os.path.realpath(hr)]
    assert any(e["event"].startswith("knowledge base index was built from other folders") for e in logs), logs
    # A reload's retriever does not take it over from the one before either.
    old = Retriever.from_config(cfg, Embedder())
    old.refresh(["hr"])
    assert old.search(["hr"], HR_QUESTION)[0].source == "leave.md"
    r2 = Retriever.from_config(cfg2, old.embedder)
    r2.adopt(old, ["hr"])
    assert r2.search(["hr"], HR_QUESTION) == []
    r2.refresh(["hr"])
    assert not r2.has_index("hr")
    # Rebuilt from its own folder, it is served, with only its own documents.
    ingest("hr", [other], cfg.server.state_dir, Embedder(), 800)
    r2.refresh(["hr"])
    assert r2.sources("hr") == {"canteen.md": 1}


def _toml(tmp_path: Path, redis_port: int, hr_folder: Path) -> Path:
    path = tmp_path / "botd.toml"
    path.write_text(f'[server]\nport = 0\nstate_dir = "{tmp_path / "state"}"\n\n'
                    f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n\n'
                    f'[knowledge.hr]\npaths = ["{hr_folder}"]\nschedule = ""\n\n'
                    '[bots.hr]\nknowledge = ["hr"]\n\n[api]\ndefault_bot = "hr"\n')
    return path


async def test_the_daemon_never_serves_an_index_of_other_folders_and_rebuilds_it(tmp_path, redis_server):
    hr, fin = write_corpus(tmp_path / "docs")
    people = tmp_path / "docs" / "people"
    people.mkdir()
    (people / "canteen.md").write_text("# Canteen\n\nLunch is served from noon to two.\n")
    # An index of "hr" from its old folder; the config now names another (never re-ingested on a schedule).
    ingest("hr", [hr], tmp_path / "state", Embedder(), 800)
    path = _toml(tmp_path, redis_server.port, people)
    async with running_daemon(load_config(path)) as api:
        retriever = api.daemon.runtime.retriever
        service = api.daemon.service

        async def ask() -> list[str]:
            answer = await service.dispatch(InboundMessage(platform="api", bot="hr", chat="c", user="u",
                                                           text=HR_QUESTION))
            hits = [h.source for h in getattr(answer, "hits", [])]
            if hasattr(answer, "cancel"):
                answer.cancel()
            return hits

        assert "leave.md" not in await ask()  # from the first answer on

        async def rebuilt() -> bool:
            return retriever.sources("hr") == {"canteen.md": 1}

        await wait_for(rebuilt, timeout=60)
        assert KnowledgeStore(tmp_path / "state", "hr").built_from() == [str(people.resolve())]

        # The admin points the base back at the HR folder and reloads: the canteen index is not
        # served a moment longer; the HR one is built although no schedule would ever run.
        path.write_text(path.read_text().replace(str(people), str(hr)))
        assert await api.daemon.reload()
        retriever = api.daemon.runtime.retriever
        assert "canteen.md" not in retriever.sources("hr")

        async def back() -> bool:
            return set(retriever.sources("hr")) == CORPUS

        await wait_for(back, timeout=60)
        assert "leave.md" in await ask()
