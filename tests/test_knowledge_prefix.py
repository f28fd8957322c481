"""A knowledge thread keeps its KV prefix: the documents come with the question that retrieved
them and stay in the thread's history as they were shown, so a follow-up reads only its own new
tokens (real model, real Redis, real embedder, the real service)."""

from __future__ import annotations

from bots.answers import JobAnswer
from bots.prompt import KNOWLEDGE_RULES
from core.messages import InboundMessage
from tests.helpers import running_daemon, wait_for
from tests.test_knowledge import HR_FACT, HR_QUESTION, corpus, ingest_all, kb_config  # noqa: F401

FOLLOW_UP = "And how many days of annual leave do I get?"


async def _ask(api, text: str) -> JobAnswer:
    service = api.daemon.service
    msg = InboundMessage(platform="api", bot="hr", chat="c1", user="u1", text=text)
    before = len(await service.history(msg.thread_key))
    answer = await service.dispatch(msg)
    assert isinstance(answer, JobAnswer), answer
    async for _ in answer.events():
        pass

    async def stored() -> bool:  # the exchange is written after the stream ends
        return len(await service.history(answer.job.request.thread_key)) > before or answer.job.text == ""

    await wait_for(stored, timeout=30)
    return answer


async def test_a_knowledge_follow_up_reads_only_its_new_tokens(tmp_path, redis_server, corpus):  # noqa: F811
    hr, fin = corpus
    cfg = kb_config(tmp_path, f"redis://127.0.0.1:{redis_server.port}/0", hr, fin, model={"max_tokens": 24})
    ingest_all(cfg)
    async with running_daemon(cfg) as api:
        first = await _ask(api, HR_QUESTION)
        messages = first.job.request.messages
        # The rules sit in the system prompt; the documents come with the question, cited.
        assert KNOWLEDGE_RULES in messages[0]["content"] and HR_FACT not in messages[0]["content"]
        assert HR_FACT in messages[-1]["content"] and first.hits[0].source == "leave.md"

        second = await _ask(api, FOLLOW_UP)
        job = second.job
        # Other documents than the first turn's: at the top of the prompt they would change its
        # first tokens and make the whole thread be read again.
        assert [h.text for h in second.hits] != [h.text for h in first.hits]
        # The first turn is repeated as it was shown, documents included.
        assert job.request.messages[1]["content"] == messages[-1]["content"]
        tokenizer = (await api.daemon.service.answers.builder_for("hr")).tokenizer
        whole = tokenizer.count_chat(job.request.messages)
        before_new_turn = tokenizer.count_chat(job.request.messages[:-1])
        new_turn = whole - before_new_turn
        # Everything up to the new question was already in the thread's KV state: reused, not read.
        assert job.cached_tokens >= first.job.usage.prompt_tokens, (job.cached_tokens, first.job.usage)
        read = job.usage.prompt_tokens - job.cached_tokens
        # The new turn, plus the end-of-turn mark of the previous answer and the opening of the
        # reply (a few template tokens).
        assert read <= new_turn + 8, (read, new_turn, job.usage.prompt_tokens, job.cached_tokens)

        # What people see of the thread is what they wrote, not the documents.
        turns = await api.daemon.service.history(job.request.thread_key)
        assert [t.content for t in turns if t.role == "user"] == [HR_QUESTION, FOLLOW_UP]
        assert turns[0].shown == messages[-1]["content"]


async def test_a_client_conversation_cites_only_the_documents_it_was_given(tmp_path, redis_server, corpus):  # noqa: F811
    hr, fin = corpus
    cfg = kb_config(tmp_path, f"redis://127.0.0.1:{redis_server.port}/0", hr, fin, model={"max_tokens": 8})
    ingest_all(cfg)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}}
    async with running_daemon(cfg) as api:
        service = api.daemon.service
        # A client conversation that ends with a tool's result: nothing retrieved is given, so
        # nothing is cited.
        answer = await service.dispatch(InboundMessage(
            platform="api", bot="hr", chat="c2", user="u1", text=HR_QUESTION, history=[], tools=[tool],
            messages=[{"role": "user", "content": HR_QUESTION},
                      {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function",
                       "function": {"name": "lookup", "arguments": "{\"q\": \"leave\"}"}}]},
                      {"role": "tool", "tool_call_id": "1", "content": "no result"}]))
        assert isinstance(answer, JobAnswer)
        assert answer.hits == [] and HR_FACT not in str(answer.job.request.messages)
        answer.cancel()
        # Ending with the user's question: the documents go into that turn, and are cited.
        answer = await service.dispatch(InboundMessage(
            platform="api", bot="hr", chat="c3", user="u1", text=HR_QUESTION, history=[], tools=[tool],
            messages=[{"role": "user", "content": HR_QUESTION}]))
        assert isinstance(answer, JobAnswer)
        assert answer.hits and HR_FACT in answer.job.request.messages[-1]["content"]
        answer.cancel()
