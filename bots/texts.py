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
    # Attachments (bots/attachments.py): pictures and voice messages not read here, files sent in chat.
    "NOT_IMAGE": ("抱歉，我目前无法读取图片，请用文字提问。",
                  "Sorry, I cannot read pictures here. Please send your question as text."),
    "NOT_VOICE": ("抱歉，我目前无法收听语音消息，请用文字提问。",
                  "Sorry, I cannot listen to voice messages here. Please send your question as text."),
    "IMAGE_NO_TEXT": ("图片中没有找到文字。请用文字描述您的问题。",
                      "I found no text in the picture. Please describe your question in words."),
    "IMAGE_TOO_LARGE": ("图片太大（最多 {mb} MB、{mp} 百万像素），请截取需要的部分后重新发送。",
                        "The picture is too large (at most {mb} MB, {mp} megapixels); please crop it and send it "
                        "again."),
    "IMAGE_UNREADABLE": ("抱歉，我无法读取这张图片（格式不支持、已损坏或识别超时），请换一张或用文字提问。",
                         "Sorry, I could not read this picture (unsupported, damaged or too slow to read); please "
                         "send another one or type your question."),
    "VOICE_TOO_LONG": ("语音太长（最多 {s} 秒），请分段发送或用文字提问。",
                       "The voice message is too long (at most {s} seconds); please send shorter ones or type "
                       "your question."),
    "VOICE_UNREADABLE": ("抱歉，我没能听清这条语音（格式不支持、已损坏或没有说话声），请重新录制或用文字提问。",
                         "Sorry, I could not make out this voice message (unsupported, damaged or silent); please "
                         "record it again or type your question."),
    "FILE_RECEIVED": ("收到 {name}（{size}），请提问。", "Got {name} ({size}), ask away.",
                      "收到 {name}（{size}），请提问。/ Got it: ask away."),
    "FILE_PAGES": ("{n} 页", "{n} pages"),
    "FILE_CHARS": ("{n} 字", "{n} characters"),
    "FILE_SUMMARY_ASK": ("请用一段话概括这份文件的要点。", "Summarise this file in one paragraph."),
    "FILE_TYPE": ("抱歉，{name} 不是我能读的文件：我只读 PDF、Word（.docx）、Markdown 和文本文件。",
                  "Sorry, I cannot read {name}: I read PDF, Word (.docx), Markdown and text files only."),
    "FILE_TOO_LARGE": ("抱歉，{name} 太大了：文件最大 {mb} MB。",
                       "Sorry, {name} is too large: files of up to {mb} MB."),
    "FILE_TOO_LONG": ("抱歉，{name} 太长了（超过 {n} 段），请只发送需要的部分。",
                      "Sorry, {name} is too long for me (more than {n} chunks); please send only the part you need."),
    "FILE_EMPTY": ("{name} 里没有可读的文字（是扫描件吗？）。", "{name} holds no text I can read (is it a scan?)."),
    # {why}: the parser's own words (technical, in English), e.g. "damaged PDF: ...".
    "FILE_UNREADABLE": ("抱歉，我读不了 {name}：{why}", "Sorry, I cannot read {name}: {why}"),
    "FILE_UNAVAILABLE": ("抱歉，我无法从平台取得 {name}（可能已过期），请重新发送。",
                         "Sorry, I could not fetch {name} from the platform (it may have expired); please send it "
                         "again."),
    "FILE_THREAD_FULL": ("这段对话已有 {n} 个文件，不能再添加。发送 /reset 重新开始。",
                         "This conversation already holds {n} files, the most it can. Send /reset to start over."),
    "FILE_USER_LIMIT": ("您今天已发送 {n} 个文件，达到上限，请明天再发。",
                        "You have sent {n} files today, the most allowed; please send more tomorrow."),
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
    "HELP_WECOM_AIBOT": ("在群聊中请 @我；单聊直接发消息即可。",
                         "In a group chat, @mention me; in a one-to-one chat, just write."),
    "HELP_DINGTALK": ("在群里请 @我；单聊直接发消息即可。",
                      "In a group, @mention me; in a one-to-one chat, just write."),
    "HELP_FEISHU": ("在群里请 @我；单聊直接发消息即可。",
                    "In a group, @mention me; in a one-to-one chat, just write."),
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
    # An answer still waiting for the model after [queue] notice_after_s (bots/notice.py): the
    # user's place in the fair queue and the expected wait; the answer replaces (or follows) it.
    "QUEUE_NOTICE": ("⏳ 前面还有 {n} 位，预计 {wait}", "⏳ {n} ahead of you, about {wait}"),
    "QUEUE_NEXT": ("⏳ 马上轮到您，预计 {wait}", "⏳ You are next, about {wait}"),
    "WAIT_MINUTES": ("{m} 分钟", "{m} min"),
    # Tools (bots/tooluse.py): the note before an answer that used them, and the commands.
    "TOOLS_USED": ("🔧 使用了工具：{names}\n\n", "🔧 Used: {names}\n\n", "🔧 工具 / Used: {names}\n\n"),
    "TOOL_NONE": ("此助手没有名为 {name} 的工具。可用：{names}",
                  "This bot has no tool named {name}. Available: {names}"),
    "TOOL_NO_TOOLS": ("此助手没有可用的工具。", "This bot has no tools."),
    # A tool's own reason stays as the tool gave it (technical, e.g. "HTTP 404: ...").
    "TOOL_FAILED": ("工具 {tool} 未能完成：{reason}", "The tool {tool} could not answer: {reason}"),
    "TOOL_BUSY": ("您已有 {n} 个工具调用正在进行，请等它们完成后再试。",
                  "You already have {n} tool calls running; please wait for them to finish."),
    "CALC_NONE": ("此助手没有计算器工具。", "This bot has no calculator tool."),
    "TOOL_USAGE": ("用法：/tool 工具名 参数（如 /tool weather city=上海）；加上“ -- 问题”则由模型根据结果回答。"
                   "可用：{names}",
                   "Usage: /tool NAME ARGS (e.g. /tool weather city=Shanghai); add \" -- QUESTION\" to have the "
                   "model answer from the result. Available: {names}"),
    "CALC_USAGE": ("用法：/calc 表达式，如 /calc 2340 的 17%、/calc 3 km in m",
                   "Usage: /calc EXPRESSION, e.g. /calc 17% of 2340, /calc 3 km in m"),
    # Alerts to the admins' WeCom group robot ([notify]): each names the instance, the event and
    # the detail; "NOTIFY_" + the event's name in capitals (core.notify, bots.daemon).
    "NOTIFY_INGEST_FAILED": ("【botd {instance}】知识库 {kb} 重新读取失败，继续使用原有索引。原因：{error}",
                             "[botd {instance}] Knowledge base {kb}: the ingest failed; the previous index "
                             "stays in use. Reason: {error}"),
    "NOTIFY_INGEST_SKIPPED": ("【botd {instance}】知识库 {kb} 已重新读取，但有 {count} 个文档无法读取而被跳过：{files}",
                              "[botd {instance}] Knowledge base {kb} was ingested, but {count} documents could "
                              "not be read and were skipped: {files}"),
    "NOTIFY_REDIS_DOWN": ("【botd {instance}】无法连接 Redis（{redis}），对话历史与去重暂时降级，恢复后会再通知。"
                          "错误：{error}",
                          "[botd {instance}] Redis is unreachable ({redis}): history and dedupe are degraded "
                          "until it returns. Error: {error}"),
    "NOTIFY_REDIS_UP": ("【botd {instance}】Redis 已恢复连接（{redis}），中断约 {down_s} 秒。",
                        "[botd {instance}] Redis is reachable again ({redis}) after about {down_s} s."),
    "NOTIFY_MODEL_RELOAD": ("【botd {instance}】重新加载配置后已换用新模型 {model}（{source}）。",
                            "[botd {instance}] Reload: the new model {model} is loaded ({source})."),
    "NOTIFY_MODEL_FAILED": ("【botd {instance}】新模型 {model} 加载失败，继续使用原模型。原因：{error}",
                            "[botd {instance}] Reload: the new model {model} did not load; the previous model "
                            "stays. Reason: {error}"),
    "NOTIFY_RELOAD_FAILED": ("【botd {instance}】配置文件有误，重新加载被拒绝，继续使用当前配置：{error}",
                             "[botd {instance}] Reload refused: the config file has an error; the running "
                             "config stays: {error}"),
    "NOTIFY_DEAD_LETTER": ("【botd {instance}】一条 {platform} 消息（机器人 {bot}，会话 {chat}）已被处理 {deliveries} "
                           "次仍未答完，不再重试，已移入死信列表 {list_name}（request_id {request_id}）。",
                           "[botd {instance}] A {platform} message (bot {bot}, chat {chat}) was handed out "
                           "{deliveries} times without being answered; it is not tried again and was moved to the "
                           "dead-letter list {list_name} (request_id {request_id})."),
    "NOTIFY_STARTED": ("【botd {instance}】已启动：模型 {model}，监听 {url}。",
                       "[botd {instance}] Started: model {model}, listening on {url}."),
    "NOTIFY_STOPPING": ("【botd {instance}】正在停止。", "[botd {instance}] Stopping."),
    "NOTIFY_SUPPRESSED": ("【botd {instance}】为遵守群机器人每分钟 {limit} 条的限制，另有 {n} 条告警合并在此"
                          "（{counts}）：\n{lines}",
                          "[botd {instance}] {n} more alerts, held back by the group robot's limit of {limit} "
                          "a minute ({counts}):\n{lines}"),
    "FEEDBACK_UP": ("👍 有帮助", "👍 Helpful"),
    "FEEDBACK_DOWN": ("👎 没帮助", "👎 Not helpful"),
    "FEEDBACK_PROMPT": ("这个回答有帮助吗？", "Was this answer helpful?"),
    "FEEDBACK_REASON_HINT": ("哪里不对？（可选）", "What was wrong? (optional)"),
    "FEEDBACK_GONE": ("这个回答已无法评价。", "This answer can no longer be rated."),
    "FEEDBACK_REASON_THANKS": ("原因已记下，谢谢！", "Reason noted, thank you!"),
    "FEEDBACK_ASK_REASON": ("哪里不对？回复这条消息说明原因（可选）。",
                            "What was wrong? Reply to this message with the reason (optional)."),
    "FEEDBACK_THANKS": ("谢谢您的反馈！", "Thanks for your feedback!"),
}
# Which help text a platform adds.
PLATFORM_HELP = {"slack": "HELP_SLACK", "telegram": "HELP_TELEGRAM", "wecom_aibot": "HELP_WECOM_AIBOT",
                 "dingtalk": "HELP_DINGTALK", "feishu": "HELP_FEISHU"}


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


def alert(event: str, lang: Lang, **fields: object) -> str:
    """The admin alert ``event`` ([notify] events, and "suppressed") in ``lang``."""
    return say(f"NOTIFY_{event.upper()}", lang, **fields)


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
