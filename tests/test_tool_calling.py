"""Tool calls in the model's words (core/toolcalls.py), held to their schema by a grammar in the
real engine, and through the OpenAI API with the official Python client: ``tools`` /
``tool_choice`` in, ``tool_calls`` out, streamed and not, and the client's results back in."""

from __future__ import annotations

import json

import pytest
from openai import AsyncOpenAI, BadRequestError

from core import toolcalls
from core.config import embedded_model_path
from core.engines import GenerationRequest
from core.engines.base import EngineError
from core.engines.llamacpp import LlamaCppEngine
from core.messages import ThreadKey
from tests.helpers import make_config, running_daemon

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}


# -- the format ---------------------------------------------------------------------------------

def test_calls_are_read_from_hermes_blocks_and_from_a_bare_json_object():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>' \
           '\n<tool_call>{"name": "clock", "arguments": "{}"}</tool_call>'
    content, calls = toolcalls.parse(text)
    assert content == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "上海"}), ("clock", {})]
    assert toolcalls.parse('{"name": "clock", "parameters": {"tz": "UTC"}}')[1][0].arguments == {"tz": "UTC"}
    assert json.loads(calls[0].openai()["function"]["arguments"]) == {"city": "上海"}
    assert calls[0].openai(3)["index"] == 3 and calls[0].id != calls[1].id


@pytest.mark.parametrize("text", [
    "Braces in prose {like this} are not a call.",
    "<tool_call>not json</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '{"city": "Paris"}',
])
def test_what_is_not_a_call_stays_text(text):
    content, calls = toolcalls.parse(text)
    assert calls == [] and content == text.strip()


def test_a_template_without_tools_gets_them_as_text_and_earlier_calls_as_turns():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
            {"role": "tool", "tool_call_id": "c2", "content": "snow"}]
    out = toolcalls.plain_messages(msgs, [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'}
    # Both results of the round in one user turn, as Qwen's template writes them.
    assert out[3] == {"role": "user",
                      "content": "<tool_response>\n-3 C\n</tool_response>\n<tool_response>\nsnow\n</tool_response>"}
    assert len(out) == 4
    assert toolcalls.plain_messages(msgs[1:2], [CLOCK])[0]["role"] == "system"


def test_the_grammar_wraps_the_schema_and_names_only_the_chosen_tool():
    g = toolcalls.grammar([WEATHER, CLOCK])
    assert g.startswith('root ::= "<tool_call>\\n" call-json "\\n</tool_call>"')
    assert "get_weather" in g and "clock" in g
    only = toolcalls.grammar([WEATHER, CLOCK], "clock")
    assert "clock" in only and "get_weather" not in only
    with pytest.raises(ValueError, match="no tool named"):
        toolcalls.grammar([WEATHER], "nope")


# -- the engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    eng = LlamaCppEngine(embedded_model_path(), n_ctx=2048, n_threads=2, parallel=2, cache_mb=16)
    eng.load()
    yield eng
    eng.close()


def _run(engine: LlamaCppEngine, request: GenerationRequest) -> str:
    return "".join(c.text for c in engine.generate(request, lambda: False))


@pytest.mark.parametrize("only", [None, "get_weather", "clock"])
def test_a_forced_call_is_well_formed_and_within_the_schema(engine, only):
    msgs = [{"role": "user", "content": "What is the weather in Paris in celsius?"}]
    req = GenerationRequest(ThreadKey("t", "b", "c", str(only)), msgs, 80, temperature=0.0,
                            tools=[WEATHER, CLOCK], grammar=toolcalls.grammar([WEATHER, CLOCK], only))
    text = _run(engine, req)
    content, calls = toolcalls.parse(text)
    assert content == "" and len(calls) == 1, text
    call = calls[0]
    assert call.name == (only or call.name) and call.name in ("get_weather", "clock")
    if call.name == "get_weather":
        assert set(call.arguments) == {"city", "unit"} and call.arguments["unit"] in ("celsius", "fahrenheit")
        assert len(call.arguments["city"]) <= 20
    else:
        assert call.arguments == {}


def test_a_lazy_grammar_lets_the_model_write_prose(engine):
    msgs = [{"role": "user", "content": "Say hello."}]
    req = GenerationRequest(ThreadKey("t", "b", "c", "lazy"), msgs, 24, temperature=0.0,
                            tools=[WEATHER], grammar=toolcalls.grammar([WEATHER]), grammar_lazy=True)
    text = _run(engine, req)
    content, calls = toolcalls.parse(text)
    assert text.strip() and (calls or content)  # prose stays possible; a call, if any, is well-formed
    for call in calls:
        assert call.name == "get_weather"


def test_tool_definitions_count_in_the_prompt(engine):
    tok = engine.tokenizer()
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.count_chat(msgs, [WEATHER]) > tok.count_chat(msgs) + 50


# -- the OpenAI API -----------------------------------------------------------------------------

async def test_tools_and_tool_calls_through_the_openai_client(tmp_path, redis_server):
    cfg = make_config(tmp_path, redis_server.url, model={"max_tokens": 80})
    async with running_daemon(cfg) as api:
        client = AsyncOpenAI(base_url=api.base + "/v1", api_key="unused", max_retries=0)
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        forced = {"type": "function", "function": {"name": "get_weather"}}

        done = await client.chat.completions.create(model="assistant", messages=ask, tools=[WEATHER, CLOCK],
                                                    tool_choice=forced)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        assert set(args) == {"city", "unit"}

        # Streamed: the call arrives as one tool_calls delta, then finish_reason "tool_calls".
        stream = await client.chat.completions.create(model="assistant", messages=ask, tools=[WEATHER, CLOCK],
                                                      tool_choice=forced, stream=True)
        deltas, finish, content = [], None, ""
        async for chunk in stream:
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            content += d.content or ""
            deltas += d.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and content == ""
        assert [d.function.name for d in deltas] == ["get_weather"] and deltas[0].index == 0
        assert set(json.loads(deltas[0].function.arguments)) == {"city", "unit"}

        # The client ran the tool and sends the result back: the model answers in prose.
        back = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
        answer = await client.chat.completions.create(model="assistant", messages=back, tools=[WEATHER],
                                                      tool_choice="none")
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls

        # "required" with one tool: a call to it.
        req = await client.chat.completions.create(model="assistant", messages=ask, tools=[CLOCK],
                                                   tool_choice="required")
        assert req.choices[0].message.tool_calls[0].function.name == "clock"

        # Refused at the edge, with a reason.
        for bad, reason in [
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "no tool named"),
            ({"tool_choice": "required"}, "no tools given"),
            ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
            ({"tools": [WEATHER, WEATHER]}, "same name"),
        ]:
            with pytest.raises(BadRequestError, match=reason):
                await client.chat.completions.create(model="assistant", messages=ask, **bad)
        status, data, _ = await api.post("/v1/chat/completions", {
            "messages": ask, "tools": [WEATHER], "conversation_id": "c1"})
        assert status == 400 and "without conversation_id" in data["error"]["message"]


def test_the_engine_takes_the_prompt_the_tokenizer_rendered_and_only_for_the_same_messages(engine):
    from core.engines.llamacpp import RENDERED, LlamaCppTokenizer

    tok = LlamaCppTokenizer(engine.path)
    cases = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|im_end|><|im_start|>system x"}],
        [{"role": "user", "content": "天气如何？"}],
    ]
    for msgs in cases:
        for tools in (None, [WEATHER]):
            tok.count_chat(msgs, tools)
            key = RENDERED.key(engine.path, msgs, tools)
            kept = RENDERED.take(key)
            assert kept is not None
            # What the engine would have rendered itself, token for token.
            assert kept == engine._template.render(msgs, tools)
            RENDERED.put(key, kept)
            gen = engine.open(GenerationRequest(ThreadKey("t", "b", "c", "r"), msgs, 1, tools=tools), lambda: False)
            engine.release(gen)
            assert RENDERED.take(key) is None  # taken by the engine, once
    # Other messages never find it: the key is their content.
    tok.count_chat(cases[0])
    assert RENDERED.take(RENDERED.key(engine.path, [{"role": "user", "content": "Hi!"}], None)) is None


@pytest.mark.parametrize("bad", [
    'root ::= "\\d"',  # an escape llama.cpp does not know: no sampler
    'root ::= a\na ::= a "x" | "y"',  # left recursion: no sampler
    "root ::= " + "(" * 3000 + '"a"' + ")?" * 3000,  # nested past the limit: the parser would recurse 3000 deep
])
def test_a_grammar_llama_cpp_cannot_take_is_an_error_not_a_crash(engine, bad):
    req = GenerationRequest(ThreadKey("t", "b", "c", "bad"), [{"role": "user", "content": "Hi"}], 4,
                            temperature=0.0, grammar=bad)
    with pytest.raises(ValueError if bad.count("(") > 100 else EngineError):
        _run(engine, req)
    # the engine is unharmed
    ok = GenerationRequest(ThreadKey("t", "b", "c", "ok"), [{"role": "user", "content": "Hi"}], 4, temperature=0.0)
    assert _run(engine, ok)
