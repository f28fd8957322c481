"""The audit log: one JSON line per answered message, with a switch to redact the text."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_config, running_daemon


@pytest.mark.parametrize("redact", [False, True])
async def test_audit_lines(tmp_path, redis_server, redact):
    path = tmp_path / "logs" / "audit.jsonl"
    cfg = make_config(tmp_path, redis_server.url, audit={"file": str(path), "redact_text": redact})
    async with running_daemon(cfg) as api:
        data = await api.chat("What colour is the sky?", cid="au", max_tokens=12, user="dora")
        answer = data["choices"][0]["message"]["content"]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["platform"] == "api" and line["bot"] == "assistant" and line["user"] == "local:dora"
    assert line["tokens_in"] == data["usage"]["prompt_tokens"]
    assert line["tokens_out"] == data["usage"]["completion_tokens"]
    assert line["latency_ms"] >= 0 and line["request_id"] and line["ts"].endswith("Z")
    if redact:
        assert line["question"]["chars"] == len("What colour is the sky?")
        assert "sky" not in path.read_text() and answer not in path.read_text()
    else:
        assert line["question"] == "What colour is the sky?" and line["answer"] == answer
