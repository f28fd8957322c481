"""Every word the web console shows, in English and Chinese, and how a language is chosen.

The language is the ``botd_lang`` cookie when the user picked one with the switch, otherwise
the first of Chinese or English in the browser's Accept-Language.
"""

from __future__ import annotations

from connectors.web_console.i18n_quality import TEXTS as QUALITY_TEXTS

LANGS = ("en", "zh")

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "botd console",
        "nav_chat": "Chat", "nav_status": "Status", "nav_knowledge": "Knowledge",
        "nav_conversations": "Conversations", "nav_audit": "Audit",
        "logout": "Log out", "login": "Log in", "user": "User name", "password": "Password",
        "login_title": "Log in to the botd console",
        "login_failed": "Wrong user name or password.",
        "login_limited": "Too many login attempts. Try again in {s} s.",
        "login_expired": "Your session has ended; please log in again.",
        "login_reload": "The login form has expired; it has been reloaded, please try again.",
        "store_down": "Redis is unreachable, so logins cannot be checked right now. Try again shortly.",
        "role_admin": "admin", "role_department": "department", "role_viewer": "viewer",
        "bot": "Bot", "all": "all", "conversation": "Conversation", "new_conversation": "New conversation",
        "send": "Send", "stop": "Stop", "message_placeholder": "Type a message… (Enter sends, Shift+Enter: new line)",
        "attach": "Attach files (PDF, Word, Markdown, text; pictures; voice)",
        "you": "You", "asker": "User", "sources": "Sources", "queue_wait": "queue wait", "ttft": "first token",
        "tokens_per_s": "tokens/s", "prompt_reused": "prompt tokens reused", "total": "total",
        "no_chat_role": "Your role can read but not chat.",
        "busy": "Busy: {msg}", "error": "Error", "cut": "[cut: reply budget reached]",
        "model": "Model", "engine": "Engine", "file": "File", "loaded": "loaded", "not_loaded": "not loaded",
        "context": "context", "slots": "slots", "queue": "Queue", "depth": "waiting", "capacity": "capacity",
        "active": "active sequences", "generating": "generating", "idle": "idle",
        "redis": "Redis", "ok": "ok", "unreachable": "unreachable", "uptime": "up",
        "knowledge": "Knowledge bases", "connectors": "Connectors", "platform": "Platform",
        "last_event": "last event", "last_error": "last error", "events": "events", "errors": "errors",
        "recent_errors": "Recent errors", "none": "none", "never": "never",
        "chart_tps": "Tokens per second (last hour, per minute)",
        "chart_cache": "Prompt cache hit ratio (last hour)",
        "chart_queue": "Queue depth and active sequences (last hour)",
        "no_data": "no data yet",
        "live": "refreshes every 5 s",
        "state": "State", "chunks": "chunks", "documents": "Documents", "built_at": "built",
        "reingest": "Re-ingest", "reingest_started": "Re-ingest of {kb} started.",
        "reingest_running": "A re-ingest of {kb} is already running.",
        "last_ingest": "Last re-ingest", "skipped": "skipped", "granted_to": "granted to",
        "folders": "folders", "schedule": "schedule", "no_knowledge": "No knowledge base for your bots.",
        "state_ready": "ready", "state_loading": "loading", "state_building": "building",
        "state_ingesting": "ingesting…", "state_failed": "failed", "state_unknown": "unknown",
        "chat_id": "Chat", "thread": "Thread", "messages": "messages", "last_message": "last message",
        "expires": "expires in", "view": "Open", "delete": "Delete", "filter": "Filter",
        "confirm_delete": "Delete this conversation's history? This cannot be undone.",
        "deleted": "The conversation was deleted.", "no_conversations": "No conversations.",
        "back": "Back", "audit_off": "No audit log is configured ([audit] file).",
        "when": "When", "what": "What", "question": "Question", "answer": "Answer", "tokens": "tokens",
        "latency": "latency", "day": "Day", "no_lines": "No matching lines.",
        "forbidden": "You may not see or do this.", "not_found": "Not found.",
        "nav_config": "Config", "search": "Search", "search_question": "Which chunks does a question retrieve?",
        "knowledge_base": "Knowledge base", "score": "score", "similarity": "similarity",
        "no_hits": "No chunk matches.", "upload": "Upload", "upload_document": "Add a document",
        "replace_existing": "replace a file of the same name",
        "uploaded": "Uploaded; {kb} is being re-ingested.", "document_deleted": "Deleted; {kb} is being re-ingested.",
        "confirm_delete_document": "Delete this document from the knowledge base's folder?",
        "running_config": "Running configuration", "reload": "Reload config.toml",
        "config_masked": "Every secret, password hash and URL password is masked.",
        "confirm_reload": "Reload config.toml now (as SIGHUP does)?",
        "reload_applied": "The config was reloaded.",
        "reload_refused": "The reload was refused: the running config stays (see the daemon's log).",
        "reload_pending": "The reload is still under way.", "export_csv": "Export CSV",
        "language": "中文", "switch_lang": "zh", "now": "now", "minutes": "min",
        "feedback_up": "👍 Helpful", "feedback_down": "👎 Not helpful", "feedback_reason": "What was wrong? (optional)",
        "feedback_thanks": "Thanks for your feedback.", "feedback_reason_sent": "Reason noted, thank you.",
    },
    "zh": {
        "title": "botd 控制台",
        "nav_chat": "对话", "nav_status": "状态", "nav_knowledge": "知识库",
        "nav_conversations": "会话记录", "nav_audit": "审计",
        "logout": "退出登录", "login": "登录", "user": "用户名", "password": "密码",
        "login_title": "登录 botd 控制台",
        "login_failed": "用户名或密码错误。",
        "login_limited": "登录尝试次数过多，请 {s} 秒后再试。",
        "login_expired": "登录已过期，请重新登录。",
        "login_reload": "登录表单已过期，已重新加载，请再试一次。",
        "store_down": "Redis 无法连接，暂时无法验证登录，请稍后再试。",
        "role_admin": "管理员", "role_department": "部门", "role_viewer": "只读",
        "bot": "助手", "all": "全部", "conversation": "会话", "new_conversation": "新会话",
        "send": "发送", "stop": "停止", "message_placeholder": "输入消息……（回车发送，Shift+回车换行）",
        "attach": "附加文件（PDF、Word、Markdown、文本；图片；语音）",
        "you": "你", "asker": "用户", "sources": "来源", "queue_wait": "排队", "ttft": "首字",
        "tokens_per_s": "词元/秒", "prompt_reused": "复用的提示词元", "total": "总计",
        "no_chat_role": "你的角色只能查看，不能对话。",
        "busy": "繁忙：{msg}", "error": "错误", "cut": "［已截断：达到回复长度上限］",
        "model": "模型", "engine": "推理引擎", "file": "文件", "loaded": "已加载", "not_loaded": "未加载",
        "context": "上下文", "slots": "并行槽", "queue": "队列", "depth": "等待中", "capacity": "容量",
        "active": "正在生成的序列", "generating": "生成中", "idle": "空闲",
        "redis": "Redis", "ok": "正常", "unreachable": "无法连接", "uptime": "已运行",
        "knowledge": "知识库", "connectors": "连接器", "platform": "平台",
        "last_event": "最近事件", "last_error": "最近错误", "events": "事件", "errors": "错误",
        "recent_errors": "最近的错误", "none": "无", "never": "从未",
        "chart_tps": "每秒词元数（最近一小时，按分钟）",
        "chart_cache": "提示缓存命中率（最近一小时）",
        "chart_queue": "队列长度与正在生成的序列（最近一小时）",
        "no_data": "暂无数据",
        "live": "每 5 秒刷新",
        "state": "状态", "chunks": "文本块", "documents": "文档", "built_at": "构建于",
        "reingest": "重新导入", "reingest_started": "已开始重新导入 {kb}。",
        "reingest_running": "{kb} 正在重新导入中。",
        "last_ingest": "上次重新导入", "skipped": "已跳过", "granted_to": "授权给",
        "folders": "文件夹", "schedule": "计划", "no_knowledge": "你的助手没有知识库。",
        "state_ready": "就绪", "state_loading": "加载中", "state_building": "构建中",
        "state_ingesting": "导入中……", "state_failed": "失败", "state_unknown": "未知",
        "chat_id": "聊天", "thread": "话题", "messages": "条消息", "last_message": "最后消息",
        "expires": "过期剩余", "view": "查看", "delete": "删除", "filter": "筛选",
        "confirm_delete": "删除此会话的历史记录？此操作无法撤销。",
        "deleted": "会话已删除。", "no_conversations": "没有会话。",
        "back": "返回", "audit_off": "未配置审计日志（[audit] file）。",
        "when": "时间", "what": "内容", "question": "问题", "answer": "回答", "tokens": "词元",
        "latency": "耗时", "day": "日期", "no_lines": "没有匹配的记录。",
        "forbidden": "你无权查看或执行此操作。", "not_found": "未找到。",
        "nav_config": "配置", "search": "检索", "search_question": "一个问题会检索到哪些文本块？",
        "knowledge_base": "知识库", "score": "得分", "similarity": "相似度",
        "no_hits": "没有匹配的文本块。", "upload": "上传", "upload_document": "添加文档",
        "replace_existing": "替换同名文件",
        "uploaded": "已上传，正在重新导入 {kb}。", "document_deleted": "已删除，正在重新导入 {kb}。",
        "confirm_delete_document": "从知识库文件夹中删除此文档？",
        "running_config": "当前运行的配置", "reload": "重新加载 config.toml",
        "config_masked": "所有密钥、密码哈希和 URL 中的密码均已隐藏。",
        "confirm_reload": "现在重新加载 config.toml（与 SIGHUP 相同）？",
        "reload_applied": "配置已重新加载。",
        "reload_refused": "重新加载被拒绝：继续使用当前配置（详见守护进程日志）。",
        "reload_pending": "重新加载仍在进行中。", "export_csv": "导出 CSV",
        "language": "English", "switch_lang": "en", "now": "现在", "minutes": "分钟",
        "feedback_up": "👍 有帮助", "feedback_down": "👎 没帮助", "feedback_reason": "哪里不对？（可选）",
        "feedback_thanks": "谢谢您的反馈。", "feedback_reason_sent": "原因已记下，谢谢。",
    },
}

# The quality pages' words live beside (connectors/web_console/i18n_quality.py).
for _lang, _texts in QUALITY_TEXTS.items():
    TEXTS[_lang].update(_texts)

# The texts the page scripts need.
JS_KEYS = ("you", "sources", "queue_wait", "ttft", "tokens_per_s", "prompt_reused", "total", "busy", "error",
           "cut", "no_data", "loaded", "not_loaded", "generating", "idle", "ok", "unreachable", "never", "none",
           "last_event", "last_error", "events", "errors", "confirm_delete", "send", "stop", "depth", "active",
           "state_ready", "state_loading", "state_building", "state_ingesting", "state_failed", "state_unknown",
           "now", "minutes", "feedback_up", "feedback_down", "feedback_reason", "feedback_thanks",
           "feedback_reason_sent")


def choose(cookie: str | None, accept_language: str) -> str:
    """``cookie`` if it names a language, else the first of zh/en the browser prefers, else English."""
    if cookie in LANGS:
        return cookie
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in LANGS and q > 0:
            ranked.append((-q, i, primary))
    return min(ranked)[2] if ranked else "en"
