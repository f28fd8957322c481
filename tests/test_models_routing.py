"""Routing and models (issue 16, item 4): [[routes]] rules, several models loaded lazily (at most
``[server] max_loaded``), per-bot LoRA adapters applied per request and batched by adapter set."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from bots.routing import route
from connectors.config import config_from_dict
from core.config import ConfigError, embedded_model_path
from core.engines.base import EngineError, GenerationRequest
from core.engines.llamacpp import LlamaCppEngine
from core.messages import Account, InboundMessage, ThreadKey
from tests.helpers import REPO, make_config, running_daemon
from tests.test_batching import SENTENCES, alone, echo, never

# -- [[routes]] ---------------------------------------------------------------------------------------

BOTS = {"assistant": {}, "sales": {}, "finance": {}, "hr": {}, "vip": {}}


def routes_config(tmp_path, routes):
    return config_from_dict({"bots": BOTS, "routes": routes}, tmp_path / "config.toml", check_files=False)


def message(text="hello", platform="telegram", chat="100", user="7") -> InboundMessage:
    return InboundMessage(platform=platform, bot="", chat=chat, user=user, text=text)


async def test_routes_first_match_wins_then_the_accounts_routes_then_its_bot(tmp_path):
    cfg = routes_config(tmp_path, [
        {"bot": "vip", "platform": "telegram", "user": [42, 43]},          # ints are read as ids
        {"bot": "finance", "pattern": "(?i)invoice|发票"},
        {"bot": "sales", "platform": ["slack"], "chat": "C1"},
        {"bot": "hr", "pattern": "(?i)invoice"},                           # never reached: finance first
    ])
    acct = Account(connector="telegram", name="assistant", routes={"200": "sales"})

    async def to(msg: InboundMessage) -> str:
        return await route(cfg.routes, msg, acct)

    assert await to(message("hi", user="42")) == "vip"
    assert await to(message("my INVOICE please", user="42")) == "vip"      # the first rule matched first
    assert await to(message("my INVOICE please")) == "finance"
    assert await to(message("开发票")) == "finance"
    assert await to(message("hi", platform="slack", chat="C1")) == "sales"
    assert await to(message("hi", platform="telegram", chat="C1")) == "assistant"  # platform did not match
    assert await to(message("hi", chat="200")) == "sales"                  # the connector's own routes
    assert await to(message("hi", chat="300")) == "assistant"              # the connector's bot


async def test_department_rules_ask_the_platform_once_and_only_when_reached(tmp_path):
    cfg = routes_config(tmp_path, [
        {"bot": "vip", "user": "boss"},
        {"bot": "hr", "platform": "wecom", "department": [5]},
        {"bot": "finance", "platform": "wecom", "department": ["9", "10"]},
    ])
    acct = Account(connector="wecom", name="assistant")
    asked: list[str] = []

    def lookup(groups):
        async def departments():
            asked.append("x")
            return groups
        return departments

    assert await route(cfg.routes, message(platform="wecom", user="boss"), acct, lookup([5])) == "vip"
    assert asked == []  # a rule before the department rules matched: no lookup
    assert await route(cfg.routes, message(platform="wecom"), acct, lookup([10, 3])) == "finance"
    assert asked == ["x"]  # two department rules, one lookup
    assert await route(cfg.routes, message(platform="wecom"), acct, lookup([1])) == "assistant"

    async def broken():
        raise RuntimeError("wecom down")

    assert await route(cfg.routes, message(platform="wecom"), acct, broken) == "assistant"


def test_route_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"routes\[0\]\.bot: names no bot 'nobody'"):
        routes_config(tmp_path, [{"bot": "nobody"}])
    with pytest.raises(ConfigError, match=r"routes\.0\.pattern: not a regular expression"):
        routes_config(tmp_path, [{"bot": "hr", "pattern": "(unclosed"}])
    with pytest.raises(ConfigError, match=r"routes\.0\.chats: unknown key"):
        routes_config(tmp_path, [{"bot": "hr", "chats": ["1"]}])


def test_model_and_lora_config_is_checked(tmp_path):
    def cfg(**data):
        return config_from_dict(data, tmp_path / "config.toml", check_files=False)

    c = cfg(models={"qwen": {"path": "/m/q.gguf", "n_ctx": 8192}}, bots={"a": {"model": "qwen"}, "b": {}},
            api={"default_bot": "a"})
    assert c.named_model("qwen").name == "qwen" and c.named_model("default") is c.model  # name defaults to NAME
    assert c.server.max_loaded == 2 and c.bots["b"].model == "default"
    with pytest.raises(ConfigError, match=r"bots\.a\.model: names no model 'nope' \(models: default, qwen\)"):
        cfg(models={"qwen": {"path": "/m/q.gguf"}}, bots={"a": {"model": "nope"}}, api={"default_bot": "a"})
    with pytest.raises(ConfigError, match=r"models\.default: "):
        cfg(models={"default": {"path": "/m/q.gguf"}})
    with pytest.raises(ConfigError, match=r"bots\.a\.lora: LoRA adapters need engine = \"llama_cpp\""):
        cfg(models={"remote": {"engine": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            bots={"a": {"model": "remote", "lora": [{"path": "/x.gguf"}]}}, api={"default_bot": "a"})
    with pytest.raises(ConfigError, match=r"bots\.assistant\.lora\[0\]\.path: no such file"):
        config_from_dict({"bots": {"assistant": {"lora": [{"path": "missing.gguf"}]}}}, tmp_path / "config.toml")


# -- tiny test models, made here with gguf-py ---------------------------------------------------------

def _gguf_vocab(source) -> dict:
    """SmolLM2's tokenizer (tokens, merges, chat template) as bench/qwen_shaped.py reads a vocabulary."""
    import gguf

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from qwen_shaped import _vocab_fields
    finally:
        sys.path.remove(str(REPO / "bench"))
    return _vocab_fields(gguf, source)


def make_tiny_model(path: Path, seed: int = 1) -> Path:
    """A 2-layer llama with SmolLM2's tokenizer and random weights (~13 MB): a second model that
    loads in a blink and answers (gibberish) deterministically, differently from SmolLM2."""
    import gguf
    import numpy as np

    voc = _gguf_vocab(embedded_model_path())
    n_embd, n_ff, n_head, n_layer = 64, 128, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny random llama (tests)")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(voc["model"])
    w.add_tokenizer_pre(voc["pre"])
    w.add_token_list(voc["tokens"])
    w.add_token_types(voc["types"])
    w.add_token_merges(voc["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(voc["chat_template"])
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    w.add_tensor("token_embd.weight", normal(len(voc["tokens"]), n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + t + ".weight", normal(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", normal(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", normal(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", normal(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_lora(path: Path, seed: int = 3, rank: int = 8, std: float = 0.15) -> Path:
    """A random-weight LoRA adapter for SmolLM2-135M (llama, 30 layers, hidden 576) on the attention
    query and output projections, in the GGUF form llama.cpp loads at run time: general.type
    "adapter", adapter.type "lora", adapter.lora.alpha, and NAME.lora_a (rank x in) / NAME.lora_b
    (out x rank) for each target weight NAME."""
    import gguf
    import numpy as np

    n_embd, n_layer = 576, 30
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    rng = np.random.default_rng(seed)
    for i in range(n_layer):
        for t in ("attn_q", "attn_output"):
            name = f"blk.{i}.{t}.weight"
            w.add_tensor(name + ".lora_a", (rng.standard_normal((rank, n_embd)) * std).astype(np.float32))
            w.add_tensor(name + ".lora_b", (rng.standard_normal((n_embd, rank)) * std).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {"tiny": make_tiny_model(folder / "tiny.gguf"), "lora": make_lora(folder / "lora-a.gguf"),
            "lora_b": make_lora(folder / "lora-b.gguf", seed=11, std=0.2)}


# -- LoRA adapters in the batching engine -------------------------------------------------------------

def lreq(thread: str, messages, adapters=()) -> GenerationRequest:
    return GenerationRequest(ThreadKey("test", "bot", thread), messages, 40, temperature=0.0, repeat_penalty=1.1,
                             seed=7, adapters=adapters)


def fresh(engine: LlamaCppEngine) -> None:
    """Empty every slot and the state cache: the next answer is computed exactly as on a new engine."""
    for s in engine._slots:
        engine._trim(s, 0)
        s.owner, s.adapters = None, ()
    engine.cache.clear()


@pytest.fixture(scope="module")
def smol() -> LlamaCppEngine:
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=1024, n_threads=2, n_batch=256, parallel=4, cache_mb=64)
    eng.load()
    yield eng
    eng.close()


def test_a_lora_adapter_changes_the_answer_deterministically_and_only_for_its_requests(smol, files):
    lora = ((str(files["lora"]), 1.0),)
    fresh(smol)
    base = alone(smol, lreq("plain", echo(SENTENCES[0])))
    assert base == SENTENCES[0]
    fresh(smol)
    adapted = alone(smol, lreq("styled", echo(SENTENCES[0]), lora))
    assert adapted != base
    fresh(smol)
    assert alone(smol, lreq("styled-again", echo(SENTENCES[0]), lora)) == adapted  # deterministic
    # Half the scale is another adapter set: another answer, and no KV state shared with scale 1.
    fresh(smol)
    assert alone(smol, lreq("plain-again", echo(SENTENCES[0]))) == base  # cleared: the base model again

    # One batch window: the adapted request and two plain ones run at once; each set decodes in
    # its own steps, taking turns (neither waits for the other to finish).
    fresh(smol)
    gens = [smol.open(lreq("styled-b", echo(SENTENCES[0]), lora), never),
            smol.open(lreq("plain-b", echo(SENTENCES[1])), never),
            smol.open(lreq("plain-c", echo(SENTENCES[2])), never)]
    texts = ["", "", ""]
    steps: list[set[int]] = []
    while not all(g.done for g in gens):
        smol.step(gens)
        produced = set()
        for i, g in enumerate(gens):
            while g.out:
                c = g.out.pop(0)
                texts[i] += c.text
                produced.add(i)
        steps.append(produced)
    assert texts == [adapted, SENTENCES[1], SENTENCES[2]]  # no adapter on the plain ones, none lost on the other
    assert not any(0 in s and (s & {1, 2}) for s in steps), "an adapted and a plain sequence in one decode"
    first_done = min(i for i, s in enumerate(steps) if s) + 1
    mixed = [s for s in steps[:len(steps) - 1] if s]
    assert any(0 in s for s in mixed) and any(s & {1, 2} for s in mixed) and first_done < len(steps)


def test_kv_state_is_never_reused_under_another_adapter_set(smol, files):
    lora, other = ((str(files["lora"]), 1.0),), ((str(files["lora_b"]), 1.0),)
    fresh(smol)
    first = echo(SENTENCES[3])
    answer = alone(smol, lreq("thread", first, lora))
    follow = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": SENTENCES[4]}]
    # The same thread's next turn under the same adapter reuses its prefix ...
    gen = smol.open(lreq("thread", follow, lora), never)
    assert gen.cached_tokens > 0
    smol.release(gen)
    # ... but without it, or under another adapter, nothing computed under the first is reused.
    for adapters in ((), other):
        gen = smol.open(lreq("thread", follow, adapters), never)
        assert gen.cached_tokens == 0, adapters
        while not gen.done:
            smol.step([gen])
    # Parked (its slots given to other threads), each state is keyed by model, adapter set and
    # thread, and offered under its own set only.
    thread = ThreadKey("test", "bot", "thread")
    for s in [s for s in smol._slots if s.owner == thread]:
        smol._park(s, ThreadKey("test", "bot", "someone"))
        smol._trim(s, 0)
    assert set(smol.cache._entries) == {smol._cache_key(thread, a) for a in (lora, (), other)}
    assert all(k[0] == str(smol.path) for k in smol.cache._entries)
    restores = smol.stats.cache_restores
    gen = smol.open(lreq("thread", follow, lora), never)
    assert smol.stats.cache_restores == restores + 1 and gen.cached_tokens > 0
    smol.release(gen)


def test_an_adapter_made_for_another_model_is_refused_with_its_path(files):
    eng = LlamaCppEngine(files["tiny"], n_ctx=512, n_threads=2, n_batch=128, parallel=1, cache_mb=8)
    eng.load()
    try:
        with pytest.raises(EngineError, match=r"cannot load the LoRA adapter .*lora-a\.gguf"):
            eng.open(lreq("x", echo("hi"), ((str(files["lora"]), 1.0),)), never)
    finally:
        eng.close()


# -- the daemon: several models, max_loaded, LoRA per bot -------------------------------------------

def models_config(tmp_path, redis_url, files, max_loaded: int, **extra):
    return make_config(
        tmp_path, redis_url,
        server={"max_loaded": max_loaded},
        model={"n_ctx": 1024, "max_tokens": 40, "parallel": 4},
        models={"tiny": {"path": str(files["tiny"]), "n_ctx": 512, "max_tokens": 12, "temperature": 0.0,
                         "n_threads": 2, "parallel": 2, "cache_mb": 8}},
        bots={"assistant": {}, "gibber": {"model": "tiny"},
              "styled": {"lora": [{"path": str(files["lora"]), "scale": 1.0}]}},
        **extra,
    )


async def ask(api, bot: str, sentence: str) -> dict:
    status, data, _ = await api.post("/v1/chat/completions", {"model": bot, "messages": echo(sentence),
                                                              "user": bot})
    assert status == 200, data
    return data


def text(data: dict) -> str:
    return data["choices"][0]["message"]["content"]


async def test_two_models_side_by_side_each_bot_answered_by_its_own(tmp_path, redis_server, files):
    cfg = models_config(tmp_path, redis_server.url, files, max_loaded=2)
    async with running_daemon(cfg) as api:
        pool = api.daemon.runtime.models
        assert pool.loaded() == ["default"]  # the others load when first asked for
        smol, tiny = await asyncio.gather(ask(api, "assistant", SENTENCES[0]), ask(api, "gibber", SENTENCES[0]))
        assert smol["model"] == "smollm2-135m" and text(smol) == SENTENCES[0]
        assert tiny["model"] == "tiny" and text(tiny) != SENTENCES[0] and text(tiny)
        assert text(await ask(api, "gibber", SENTENCES[0])) == text(tiny)  # the same random model again
        assert pool.loaded() == ["default", "tiny"]
        status, health = await api.get("/healthz")
        assert status == 200 and health["model_loaded"]
        assert {n: (m["loaded"], m["loads"]) for n, m in health["models"].items()} == {
            "default": (True, 1), "tiny": (True, 1)}
        async with api.session.get(api.base + "/metrics") as r:
            body = await r.text()
        assert 'botd_model_loaded{model="tiny"} 1.0' in body and 'botd_model_loads_total{model="default"} 1.0' in body


async def test_max_loaded_one_swaps_the_models(tmp_path, redis_server, files):
    cfg = models_config(tmp_path, redis_server.url, files, max_loaded=1)
    async with running_daemon(cfg) as api:
        pool = api.daemon.runtime.models
        tiny_text = text(await ask(api, "gibber", SENTENCES[1]))
        assert pool.loaded() == ["tiny"]  # the default gave way
        status, health = await api.get("/healthz")
        assert status == 200 and health["status"] == "ok"  # still serving, the default swapped out
        assert text(await ask(api, "assistant", SENTENCES[1])) == SENTENCES[1]
        assert pool.loaded() == ["default"]
        # Both at once: one waits for the other's model to go, then is answered by its own.
        smol, tiny = await asyncio.gather(ask(api, "assistant", SENTENCES[2]), ask(api, "gibber", SENTENCES[1]))
        assert (smol["model"], text(smol)) == ("smollm2-135m", SENTENCES[2])
        assert (tiny["model"], text(tiny)) == ("tiny", tiny_text)
        assert len(pool.loaded()) == 1
        assert pool.models["default"].loads >= 2 and pool.models["tiny"].loads >= 2

        # Memory is checked before a model loads: one that does not fit is refused, named.
        pool._memory = lambda: 1024 * 1024  # 1 MiB free
        bot, model = ("gibber", "tiny") if pool.loaded() == ["default"] else ("assistant", "default")
        status, data, _ = await api.post("/v1/chat/completions", {"model": bot, "messages": echo("hi")})
        assert status == 500, data
        assert f"not enough memory to load the model {model!r}" in data["error"]["message"], data
        assert not pool.models[model].loaded and pool.models[model].last_error


async def test_a_bots_lora_adapter_never_reaches_another_bots_request(tmp_path, redis_server, files):
    cfg = models_config(tmp_path, redis_server.url, files, max_loaded=2)
    async with running_daemon(cfg) as api:
        plain = [text(await ask(api, "assistant", s)) for s in SENTENCES[:3]]
        assert plain == SENTENCES[:3]
        styled = text(await ask(api, "styled", SENTENCES[0]))
        assert styled != SENTENCES[0]  # the adapter changes the answer ...
        assert text(await ask(api, "styled", SENTENCES[0])) == styled  # ... the same way each time
        # All at once, in one batch window: the adapter stays on the styled bot's request.
        together = await asyncio.gather(ask(api, "styled", SENTENCES[0]), ask(api, "assistant", SENTENCES[1]),
                                        ask(api, "assistant", SENTENCES[2]))
        assert [text(d) for d in together] == [styled, SENTENCES[1], SENTENCES[2]]
        assert all(d["model"] == "smollm2-135m" for d in together)  # one base model, no reload
        assert api.daemon.runtime.models.models["default"].loads == 1
