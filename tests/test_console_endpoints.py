"""The web console's knowledge, audit-export and config endpoints, against the real daemon,
model and Redis over real HTTP: who may, bad input refused with nothing changed, every action
in the audit log. (Logins, chat, conversations and status: tests/test_console.py.)"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import running_daemon, wait_for
from tests.test_console import KEY, PASSWORDS, Browser, _ready, _signing_key, browsers, console_config

__all__ = ["_signing_key"]  # the autouse fixture: the console's signing key in the environment

LEAVE = "# Sabbatical\n\nAfter five years every employee may take a sabbatical of 3 months, paid at 60 percent.\n"


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _actions(tmp_path: Path) -> set[tuple[str, str]]:
    return {(a.get("user"), a.get("action")) for a in _audit(tmp_path) if a.get("platform") == "console"}


async def _upload(b: Browser, kb: str, name: str, data: bytes, *, csrf: bool = True, quote: bool = True,
                  **fields: str) -> tuple[int, Any]:
    form = aiohttp.FormData(quote_fields=quote)
    form.add_field("kb", kb)
    for k, v in fields.items():
        form.add_field(k, v)
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    return await b.post("/api/knowledge/upload", csrf=csrf, data=form, headers={"Accept": "application/json"})


async def _ingested(b: Browser, kb: str) -> None:
    async def done() -> bool:
        bases = (await b.get("/api/knowledge"))[1]["knowledge"]
        k = next(x for x in bases if x["name"] == kb)
        return bool(k["progress"]) and not k["progress"]["running"] and k["state"] == "ready"

    await wait_for(done, timeout=60, interval=0.2)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_documents_upload_delete_and_search_with_roles_and_bad_input(tmp_path, redis_server):
    cfg = console_config(tmp_path, redis_server.url, knowledge=True)
    hr_dir, it_dir = tmp_path / "docs" / "hr", tmp_path / "docs" / "it"
    async with running_daemon(cfg) as api, browsers(api, "alice", "ivan", "vera", "root", "") as (
            alice, ivan, vera, root, anon):
        await wait_for(lambda: _ready(api), timeout=90)

        # Not logged in: 401, nothing written.
        assert (await _upload(anon, "hr", "x.md", b"# x\n", csrf=False))[0] == 401
        assert (await anon.get("/api/knowledge/search?q=leave"))[0] == 401
        assert (await anon.post("/api/knowledge/delete", csrf=False, json={"kb": "hr",
                                                                             "source": "hr-policy.md"}))[0] == 401

        # Bad input: refused, the folder unchanged (no temporary file left either).
        before = _files(hr_dir)
        bad = [
            (await _upload(alice, "hr", "sabbatical.md", LEAVE.encode(), csrf=False), 403),
            (await _upload(alice, "hr", "../escape.md", LEAVE.encode()), 400),
            (await _upload(alice, "hr", "sub/escape.md", LEAVE.encode()), 400),
            (await _upload(alice, "hr", "sub/escape.md", LEAVE.encode(), quote=False), 400),
            (await _upload(alice, "hr", "../../escape.md", LEAVE.encode(), quote=False), 400),
            (await _upload(alice, "hr", "..\\escape.md", LEAVE.encode()), 400),
            (await _upload(alice, "hr", ".hidden.md", LEAVE.encode()), 400),
            (await _upload(alice, "hr", "tool.exe", b"MZ\x90\x00"), 415),
            (await _upload(alice, "hr", "fake.pdf", b"# not a pdf"), 415),
            (await _upload(alice, "hr", "fake.docx", b"plain text"), 415),
            (await _upload(alice, "hr", "binary.md", b"\xff\xfe\x00bad"), 415),
            (await _upload(alice, "hr", "empty.md", b""), 400),
            (await _upload(alice, "hr", "hr-policy.md", b"# replaced\n"), 409),  # exists, no replace=1
            (await _upload(alice, "ghost", "a.md", b"# a\n"), 404),
            (await _upload(alice, "hr", "big.md", b"a" * (1_048_576 + 10)), 413),
            (await alice.post("/api/knowledge/upload", json={"kb": "hr", "file": "x"}), 415),
        ]
        for (status, body), want in bad:
            assert status == want, (status, body)
        # A JSON body that is not an object: 400 invalid_json, saying what to send, on each endpoint that reads one.
        for path, raw, told in (("/api/knowledge/delete", b"{not json", "send a JSON object or a form"),
                                ("/api/knowledge/delete", b"[1]", "send a JSON object"),
                                ("/api/chat", b"{not json", "send a JSON object"),
                                ("/api/chat", b"[]", "send a JSON object"),
                                ("/api/feedback", b"{not json", "send a JSON object"),
                                ("/api/feedback", b'"up"', "send a JSON object")):
            status, got = await alice.post(path, data=raw, headers={"Content-Type": "application/json"})
            assert (status, got["error"]["code"], got["error"]["message"]) == (400, "invalid_json", told), (path, got)
        assert _files(hr_dir) == before and (hr_dir / "hr-policy.md").read_text().startswith("# HR policy")
        assert not (tmp_path / "docs" / "escape.md").exists()

        # A department user: only its own bases, by direct request.
        it_before = _files(it_dir)
        assert (await _upload(alice, "it", "sabbatical.md", LEAVE.encode()))[0] == 403
        assert (await alice.post("/api/knowledge/delete", json={"kb": "it", "source": "it-policy.md"}))[0] == 403
        assert (await alice.get("/api/knowledge/search", params={"q": "VPN password", "kb": "it"}))[0] == 403
        status, page = await alice.get("/knowledge", params={"q": "VPN password", "kb": "it"})
        assert status == 403 and "rotates" not in page
        assert _files(it_dir) == it_before
        # Search without a base: only its own bases' chunks.
        status, body = await alice.get("/api/knowledge/search", params={"q": "VPN password rotates"})
        assert status == 200 and {h["kb"] for h in body["hits"]} <= {"hr"}
        # A viewer reads (searches) and changes nothing.
        assert (await _upload(vera, "hr", "sabbatical.md", LEAVE.encode()))[0] == 403
        assert (await vera.post("/api/knowledge/delete", json={"kb": "hr", "source": "hr-policy.md"}))[0] == 403
        assert (await vera.get("/api/knowledge/search", params={"q": "leave bonus"}))[0] == 200
        # Bad searches.
        assert (await alice.get("/api/knowledge/search", params={"q": "  "}))[0] == 400
        assert (await alice.get("/api/knowledge/search", params={"q": "x" * 1001}))[0] == 400
        assert (await alice.get("/api/knowledge/search", params={"q": "x", "kb": "ghost"}))[0] == 404
        # Deleting what is not a document of the base.
        for source in ("../../audit.jsonl", "/etc/passwd", "ghost.md", ""):
            assert (await alice.post("/api/knowledge/delete", json={"kb": "hr", "source": source}))[0] == 404
        assert (tmp_path / "audit.jsonl").exists() and _files(hr_dir) == before

        # Upload: written into the folder, re-ingested, then found by the search with its score.
        status, body = await _upload(alice, "hr", "sabbatical.md", LEAVE.encode())
        assert status == 201 and body["reingest"] is True, body
        assert (hr_dir / "sabbatical.md").read_bytes() == LEAVE.encode()
        assert not [n for n in _files(hr_dir) if n.startswith(".upload-")]
        await _ingested(alice, "hr")
        status, body = await alice.get("/api/knowledge/search", params={"q": "How long is a sabbatical?",
                                                                       "kb": "hr"})
        assert status == 200 and body["hits"][0]["source"] == "sabbatical.md", body
        assert "3 months" in body["hits"][0]["text"] and body["hits"][0]["score"] > 0
        status, body = await alice.get("/api/knowledge")
        docs = {d["source"] for d in body["knowledge"][0]["documents"]}
        assert docs == {"hr-policy.md", "sabbatical.md"}
        # The page shows it too (server-rendered: works without JavaScript).
        status, page = await alice.get("/knowledge", params={"q": "sabbatical"})
        assert status == 200 and "3 months" in page and "sabbatical.md" in page
        # Replacing needs replace=1.
        status, _ = await _upload(alice, "hr", "sabbatical.md", (LEAVE + "\nUpdated.\n").encode(), replace="1")
        assert status == 201 and (hr_dir / "sabbatical.md").read_text().endswith("Updated.\n")
        await _ingested(alice, "hr")

        # Delete (the form, as the page sends it), then the search no longer finds it.
        status, _ = await alice.post("/api/knowledge/delete", csrf=False,
                                     data={"kb": "hr", "source": "sabbatical.md", "csrf": alice.csrf})
        assert status == 303 and not (hr_dir / "sabbatical.md").exists()
        await _ingested(alice, "hr")
        status, body = await alice.get("/api/knowledge/search", params={"q": "sabbatical", "kb": "hr"})
        assert all(h["source"] != "sabbatical.md" for h in body["hits"])

        # Admins upload anywhere; every action, and every refusal, is in the audit log.
        assert (await _upload(root, "it", "vpn.txt", b"Use the VPN client 7.\n"))[0] == 201
        await _ingested(root, "it")
        done = _actions(tmp_path)
        for action in ("upload_document", "delete_document", "search", "refused"):
            assert ("alice", action) in done, action
        assert ("root", "upload_document") in done and ("vera", "refused") in done
        upload = next(a for a in _audit(tmp_path) if a.get("action") == "upload_document")
        assert upload["knowledge"] == "hr" and upload["document"] == "sabbatical.md" and upload["ts"]


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """A config as TOML (enough for a config_from_dict one: scalars, lists, tables)."""
    flat, tables = [], []
    for k, v in data.items():
        key = k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)
        if isinstance(v, dict):
            tables.append(_toml(v, f"{prefix}{key}."))
            if not v:
                tables.append(f"[{prefix}{key}]\n")
        else:
            flat.append(f"{key} = {json.dumps(v)}")
    head = f"[{prefix[:-1]}]\n" if prefix and flat else ""
    return head + "".join(line + "\n" for line in flat) + "".join(tables)


async def test_audit_csv_config_masked_and_reload(tmp_path, redis_server):
    cfg = console_config(tmp_path, redis_server.url)
    async with running_daemon(cfg) as api, browsers(api, "alice", "vera", "root", "") as (alice, vera, root, anon):
        status, events, _ = await alice.chat("hr", "=HYPERLINK(\"http://evil\")", max_tokens=4)
        assert status == 200 and events[-1]["done"]
        await wait_for(lambda: _has_bot(tmp_path, "hr"), timeout=10)

        # CSV export: the same filters as the page; a department user's own bots only.
        assert (await anon.get("/api/audit.csv"))[0] == 401
        async with root.http.get(root.base + "/api/audit.csv") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
            assert "attachment" in r.headers["Content-Disposition"]
            text = (await r.read()).decode("utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
        assert {"ts", "platform", "user", "bot", "action", "question", "details"} <= set(rows[0])
        assert any(r["action"] == "login" and r["user"] == "alice" for r in rows)
        chat = next(r for r in rows if r["bot"] == "hr" and r["platform"] == "web")
        # A cell a spreadsheet would run as a formula is quoted.
        assert chat["question"].startswith("'=HYPERLINK")
        status, text = await alice.get("/api/audit.csv")
        assert status == 200 and {r["bot"] for r in csv.DictReader(io.StringIO(text.lstrip("\ufeff")))} == {"hr"}
        assert (await alice.get("/api/audit.csv?bot=it"))[0] == 403
        assert (await alice.get("/api/audit.csv?day=yesterday"))[0] == 400
        status, page = await root.get("/audit")
        assert status == 200 and "/console/api/audit.csv" in page

        # Config: admins only; every secret masked, never resolved onto the page.
        for path in ("/config", "/api/config"):
            assert (await alice.get(path))[0] == 403 and (await vera.get(path))[0] == 403
        assert (await anon.get("/api/config"))[0] == 401
        status, page = await root.get("/config")
        assert status == 200 and "********" in page and 'id="config"' in page
        status, body = await root.get("/api/config")
        conf = body["config"]
        assert conf["console"]["signing_key"] == "********"
        assert conf["console"]["users"]["alice"]["password_hash"] == "********"
        assert conf["bots"]["hr"]["system_prompt"] == "You are the HR assistant."
        dumped = json.dumps(body) + page
        assert KEY not in dumped and "$argon2" not in dumped and "BOTD_TEST_CONSOLE_KEY" not in dumped
        assert not any(pw in dumped for pw in PASSWORDS.values())
        status, page = await alice.get("/chat")
        assert "/console/config" not in page  # no link for non-admins (and 403 above by direct request)

        # Reload: admins only, with the CSRF token. No config.toml on disk: refused, the running
        # config stays; a valid file with a new bot: applied.
        assert (await alice.post("/api/config/reload"))[0] == 403
        assert (await root.post("/api/config/reload", csrf=False))[0] == 403
        status, body = await root.post("/api/config/reload")
        assert status == 422 and body["reload"] == "refused"
        data = cfg.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        data["bots"]["finance"] = {"system_prompt": "You are the finance bot."}
        _write(Path(cfg.source), _toml(data))
        status, body = await root.post("/api/config/reload")
        assert status == 200 and body["reload"] == "applied", body
        assert "finance" in api.daemon.service.bot_names()
        status, _ = await root.post("/api/config/reload", csrf=False, data={"csrf": root.csrf})
        assert status == 303
        done = _actions(tmp_path)
        assert ("root", "audit_export") in done and ("root", "reload_config") in done
        assert ("alice", "refused") in done


async def _has_bot(tmp_path: Path, bot: str) -> bool:
    return any(a.get("bot") == bot for a in _audit(tmp_path))
