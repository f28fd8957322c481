"""bots/pipeline.py alone: what ``dispatch`` decides before any prompt is built (refusals,
commands, replays, limits), on a real Redis. No model is loaded: none of these reach the
engine; answers that do are the end-to-end tests' (test_service.py, test_api*.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bots import texts
from bots.answers import TextAnswer
from bots.service import ChatService
from core.config import Settings
from core.dispatch import Busy, Rejected
from core.messages import ChatTurn, InboundMessage
from core.runtime import Runtime
from tests.helpers import RedisServer, make_config


@pytest.fixture
async def service(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[ChatService]:
    cfg = make_config(tmp_path, redis_server.url, api={"default_bot": "helper", "max_input_chars": 50},
                      limits={"user_messages_per_minute": 1},
                      bots={"helper": {"language": "auto"}, "zh": {"language": "zh"}})
    runtime = Runtime(Settings(cfg))
    await runtime.redis.start()
    try:
        yield ChatService(runtime.settings, runtime)
    finally:
        await runtime.redis.close()


def _msg(text: str, bot: str = "helper", **kw: object) -> InboundMessage:
    return InboundMessage(platform="api", bot=bot, chat="c1", user="u1", text=text, **kw)  # type: ignore[arg-type]


async def _refused(service: ChatService, msg: InboundMessage) -> Rejected:
    with pytest.raises(Rejected) as caught:
        await service.answers.dispatch(msg)
    return caught.value


async def test_refusals_name_their_status(service):
    unknown = await _refused(service, _msg("hi", bot="ghost"))
    assert (unknown.status, unknown.code) == (404, "unknown_bot") and "helper, zh" in unknown.message
    long = await _refused(service, _msg("x" * 51))
    assert (long.status, long.code) == (413, "input_too_long")
    assert (await _refused(service, _msg("   "))).status == 400


async def test_a_command_is_answered_by_the_commands_in_the_messages_language(service):
    answer = await service.answers.dispatch(_msg("/help"))  # nothing to judge the language by: both
    assert isinstance(answer, TextAnswer) and answer.text == texts.say("HELP", "both", bot="helper")
    zh = await service.answers.dispatch(_msg("/reset", bot="zh"))
    assert isinstance(zh, TextAnswer) and zh.text == texts.say("RESET_NOTHING", "zh")
    # A client's own conversation (the API's messages) is not read as a command.
    given = _msg("/reset", history=[ChatTurn("user", "hi")])
    with pytest.raises(AssertionError, match="runtime not started"):  # it went on to build a prompt
        await service.answers.dispatch(given)


async def test_a_stored_answer_is_replayed_as_it_was(service):
    answer = await service.answers.dispatch(_msg("What is the leave policy?", final_answer="25 days."))
    assert isinstance(answer, TextAnswer) and answer.text == "25 days."
    events = [ev async for ev in answer.events()]
    assert events[-1].done and events[-1].text == "25 days."


async def test_past_the_users_limit_is_busy_per_user_in_the_users_language(service):
    with pytest.raises(AssertionError, match="runtime not started"):  # admitted: went on to the prompt
        await service.answers.dispatch(_msg("第一个问题"))
    with pytest.raises(Busy) as caught:
        await service.answers.dispatch(_msg("第二个问题"))
    busy = caught.value
    assert busy.per_user and busy.retry_after > 0
    # Told in Chinese, the message's language.
    assert busy.user_message == texts.say("RATE_LIMITED", "zh", wait=texts.wait_text(busy.retry_after, "zh"),
                                          detail=busy.reason)
