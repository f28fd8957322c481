"""Every text botd itself says to a chat user, in Chinese and English, in one place.

Connectors say nothing of their own to a user: they hand the message up, and the words
come from here. "Busy" and "failed" must never read alike: busy means "nothing went
wrong, come back in a few seconds", failed means "an error on botd's side; trying again
the same way may not help".
"""

from __future__ import annotations

BUSY = "我现在有点忙，请 {s} 秒后再发一次。\nI am busy right now; please send it again in {s} s."
FAILED = ("抱歉，这次回答时我这边出错了（已记入日志）。可以换个说法再问，或告诉管理员。\n"
          "Sorry, answering failed because of an error on my side (it is logged). "
          "Try rephrasing, or tell your admin.")
KNOWLEDGE_LOADING = ("我的知识库还在加载中，请 {s} 秒后再问一次。\n"
                     "My knowledge base is still loading; please ask again in {s} s.")
NOT_TEXT = "抱歉，我目前只能阅读文字消息，请用文字提问。\nSorry, I read text only. Please send your question as text."
NOT_ALLOWED = "抱歉，您没有使用此助手的权限。\nSorry, you are not allowed to use this assistant."
# Shown when the answer is empty (the model said nothing).
EMPTY = "…"

HELP = (
    "我是 {bot}，一个运行在本地模型上的助手。给我发消息即可，我会记住这段对话。\n"
    "命令：/reset 忘掉这段对话重新开始；/help 显示本说明。\n"
    "I am {bot}, an assistant running on a local model.\n"
    "Send me a message and I will answer; I remember this conversation.\n"
    "Commands:\n"
    "/reset - forget this conversation and start over\n"
    "/help - show this message"
)
# Added to the help on platforms where the bot is addressed in a particular way.
PLATFORM_HELP = {
    "slack": ("在频道里 @我（我在话题中回答并继续跟进），或直接私信我。\n"
              "频道中每个话题是一段独立对话：在话题里 @我 并写 /reset。\n"
              "Mention me in a channel (I answer in the thread and follow up there), or message me directly. "
              "In a channel each thread is its own conversation: mention me with /reset in the thread."),
    "telegram": ("在群组中请 @我 或回复我的消息。\n"
                 "In a group, mention me or reply to one of my messages."),
}
RESET_DONE = "好了，我已忘掉这段对话。\nDone: I have forgotten this conversation."
RESET_NOTHING = "没有需要忘掉的：这是一段新对话。\nNothing to forget: this conversation is new."
STORE_DOWN = "我暂时连不上我的记忆存储，请稍后再试。\nI cannot reach my memory right now; try again soon."

KB_HELP = (
    "知识库命令（仅限本助手的管理员）：\n/kb sources 列出我所依据的文档\n/kb ingest 立即重新读取文档\n"
    "Knowledge base commands (admins of this bot only):\n"
    "/kb sources - list the documents this bot answers from\n"
    "/kb ingest - re-read this bot's documents now"
)
KB_ADMINS_ONLY = "此命令仅限本助手的管理员使用。\nThis command is for the administrators of this bot."
KB_NONE = "此助手没有知识库。\nThis bot has no knowledge base."
KB_SOURCES_LINE = "{kb}: {files} 个文档 / documents, {chunks} 段 / chunks"
KB_NO_INGEST = ("这里无法重新读取，请在服务器上运行 `botd kb ingest`。\n"
                "Ingest is not available here; run `botd kb ingest` on the server.")
KB_INGEST_STARTED = ("已开始重新读取：{kbs}。完成后即使用新文档。\n"
                     "Re-ingest started for: {kbs}. New documents are used once it finishes.")
SOURCES = "\n\n来源 / Sources: {cites}"
