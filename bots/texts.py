"""Every text botd itself says to a chat user, in Chinese and English, in one place.

Each text is a pair (Chinese, English), sometimes with a third, combined form; ``say(key,
lang, **fields)`` gives the one the message needs. A bot's ``language`` ("zh", "en" or
"auto") and the user's message decide it once per message (:func:`language`): "auto" reads
the message -- any Chinese character makes it Chinese, else English -- and a message with
no words to judge (a photo, a file, a bare "/help") gets both languages.

Connectors say nothing of their own to a user: they hand the message up, and the words
come from here. "Busy" and "failed" must never read alike: busy means "nothing went
wrong, come back in a few seconds", failed means "an error on botd's side; trying again
the same way may not help".
"""

from __future__ import annotations

import re
from typing import Literal

# What a message is answered in; "both" is Chinese then English.
Lang = Literal["zh", "en", "both"]
# What a bot is configured with ([bots.NAME] language).
Setting = Literal["zh", "en", "auto"]

# Han ideographs: the unified block, extension A and the compatibility block.
_HAN = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")


def detect(text: str) -> Lang:
    """The language of a user's message: Chinese if it holds any Han character, else English."""
    return "zh" if _HAN.search(text) else "en"


def language(setting: str, text: str | None) -> Lang:
    """The language of the answer to one message, from the bot's setting and the message."""
    if setting == "zh":
        return "zh"
    if setting == "en":
        return "en"
    if text and text.strip().startswith("/"):
        # A command ("/help", "/reset") has no words to judge unless Chinese ones follow it.
        return "zh" if _HAN.search(text) else "both"
    if text and text.strip():
        return detect(text)
    return "both"  # auto, and nothing to judge: say it in both


# key -> (Chinese, English) or (Chinese, English, both); fields in {braces}.
_TEXTS: dict[str, tuple[str, ...]] = {
    "BUSY": ("我现在有点忙，请 {s} 秒后再发一次。",
             "I am busy right now; please send it again in {s} s."),
    "FAILED": ("抱歉，这次回答时我这边出错了（已记入日志）。可以换个说法再问，或告诉管理员。",
               "Sorry, answering failed because of an error on my side (it is logged). "
               "Try rephrasing, or tell your admin."),
    "KNOWLEDGE_LOADING": ("我的知识库还在加载中，请 {s} 秒后再问一次。",
                          "My knowledge base is still loading; please ask again in {s} s."),
    "NOT_TEXT": ("抱歉，我目前只能阅读文字消息，请用文字提问。",
                 "Sorry, I read text only. Please send your question as text."),
    "NOT_ALLOWED": ("抱歉，您没有使用此助手的权限。",
                    "Sorry, you are not allowed to use this assistant."),
    # A user over [limits]: {wait} is "40 秒" / "40 s", or hours and minutes for a daily limit.
    # The English text is the limiter's own (it names the limit); this is its Chinese.
    "RATE_LIMITED": ("您的消息或用量已达到上限，请在 {wait}后再试。", "{detail}"),
    "WAIT_SECONDS": ("{s} 秒", "{s} s"),
    "WAIT_HOURS": ("{h} 小时 {m} 分钟", "{h} h {m} min"),
    # A knowledge bot with no relevant document, when the admin kept the default refusal.
    "NO_DOCUMENT": ("我的知识库里没有这方面的文档，因此无法据此回答。请联系您部门的负责人。",
                    "I have no document on that, so I cannot answer it from our knowledge base. "
                    "Please ask your department's contact."),
    "HELP": ("我是 {bot}，一个运行在本地模型上的助手。给我发消息即可，我会记住这段对话。\n"
             "命令：\n/reset 忘掉这段对话重新开始\n/help 显示本说明",
             "I am {bot}, an assistant running on a local model.\n"
             "Send me a message and I will answer; I remember this conversation.\n"
             "Commands:\n"
             "/reset - forget this conversation and start over\n"
             "/help - show this message",
             "我是 {bot}，一个运行在本地模型上的助手。给我发消息即可，我会记住这段对话。\n"
             "命令：/reset 忘掉这段对话重新开始；/help 显示本说明。\n"
             "I am {bot}, an assistant running on a local model.\n"
             "Send me a message and I will answer; I remember this conversation.\n"
             "Commands:\n"
             "/reset - forget this conversation and start over\n"
             "/help - show this message"),
    # Added to the help on platforms where the bot is addressed in a particular way.
    "HELP_SLACK": ("在频道里 @我（我在话题中回答并继续跟进），或直接私信我。\n"
                   "频道中每个话题是一段独立对话：在话题里 @我 并写 /reset。",
                   "Mention me in a channel (I answer in the thread and follow up there), or message me directly. "
                   "In a channel each thread is its own conversation: mention me with /reset in the thread."),
    "HELP_TELEGRAM": ("在群组中请 @我 或回复我的消息。",
                      "In a group, mention me or reply to one of my messages."),
    "RESET_DONE": ("好了，我已忘掉这段对话。", "Done: I have forgotten this conversation."),
    "RESET_NOTHING": ("没有需要忘掉的：这是一段新对话。", "Nothing to forget: this conversation is new."),
    "STORE_DOWN": ("我暂时连不上我的记忆存储，请稍后再试。", "I cannot reach my memory right now; try again soon."),
    "KB_HELP": ("知识库命令（仅限本助手的管理员）：\n/kb sources 列出我所依据的文档\n/kb ingest 立即重新读取文档",
                "Knowledge base commands (admins of this bot only):\n"
                "/kb sources - list the documents this bot answers from\n"
                "/kb ingest - re-read this bot's documents now"),
    "KB_ADMINS_ONLY": ("此命令仅限本助手的管理员使用。", "This command is for the administrators of this bot."),
    "KB_NONE": ("此助手没有知识库。", "This bot has no knowledge base."),
    "KB_SOURCES_LINE": ("{kb}：{files} 个文档，{chunks} 段",
                        "{kb}: {files} documents, {chunks} chunks",
                        "{kb}: {files} 个文档 / documents, {chunks} 段 / chunks"),
    "KB_SOURCE_ITEM": ("- {src}（{n} 段）", "- {src} ({n} chunks)", "- {src} ({n} chunks)"),
    "KB_NO_INGEST": ("这里无法重新读取，请在服务器上运行 `botd kb ingest`。",
                     "Ingest is not available here; run `botd kb ingest` on the server."),
    "KB_INGEST_STARTED": ("已开始重新读取：{kbs}。完成后即使用新文档。",
                          "Re-ingest started for: {kbs}. New documents are used once it finishes."),
    # Appended to an answer from documents: plain text, it reads the same on every platform.
    "SOURCES": ("\n\n来源：{cites}", "\n\nSources: {cites}", "\n\n来源 / Sources: {cites}"),
    # Shown when the answer is empty (the model said nothing).
    "EMPTY": ("…", "…", "…"),
}
# Which help text a platform adds.
PLATFORM_HELP = {"slack": "HELP_SLACK", "telegram": "HELP_TELEGRAM"}


def say(key: str, lang: Lang, **fields: object) -> str:
    """The text ``key`` in ``lang`` ("both": Chinese line(s), then English), ``fields`` filled in."""
    forms = _TEXTS[key]
    if lang == "zh":
        text = forms[0]
    elif lang == "en":
        text = forms[1]
    else:
        text = forms[2] if len(forms) > 2 else f"{forms[0]}\n{forms[1]}"
    return text.format(**fields) if fields else text


def keys() -> list[str]:
    return list(_TEXTS)


def wait_text(seconds: int, lang: Lang) -> str:
    """A wait for a user to read: seconds, or hours and minutes past two minutes."""
    if seconds <= 120:
        return say("WAIT_SECONDS", "zh" if lang == "zh" else "en", s=seconds)
    return say("WAIT_HOURS", "zh" if lang == "zh" else "en", h=seconds // 3600, m=seconds % 3600 // 60)


# The texts in both languages, Chinese first, under their old names (their fields still to fill),
# for callers that hold no message to judge.
BUSY = say("BUSY", "both")
FAILED = say("FAILED", "both")
KNOWLEDGE_LOADING = say("KNOWLEDGE_LOADING", "both")
NOT_TEXT = say("NOT_TEXT", "both")
NOT_ALLOWED = say("NOT_ALLOWED", "both")
EMPTY = say("EMPTY", "both")
HELP = say("HELP", "both")
RESET_DONE = say("RESET_DONE", "both")
RESET_NOTHING = say("RESET_NOTHING", "both")
STORE_DOWN = say("STORE_DOWN", "both")
KB_HELP = say("KB_HELP", "both")
SOURCES = say("SOURCES", "both")
