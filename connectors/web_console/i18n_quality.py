"""The words of the console's quality pages (unanswered questions, usage, export, eval runs), in
English and Chinese; merged into :data:`connectors.web_console.i18n.TEXTS`."""

from __future__ import annotations

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "nav_unanswered": "Unanswered", "nav_usage": "Usage", "nav_export": "Export", "nav_eval": "Eval",
        "unanswered_intro": "Questions your bots refused for lack of documents, answered from barely relevant "
                            "ones, or got rated down — alike questions grouped together. The top of each list is "
                            "the document to write next.",
        "kind_no_match": "no document", "kind_low_score": "low score", "kind_down": "rated down",
        "asked": "asked", "last_asked": "last asked", "also_asked": "Also asked as",
        "make_case": "Make this a test case",
        "case_added": "Added to the test set ({path}); botd eval asks it from its next run.",
        "no_unanswered": "Nothing here: every question found its documents.",
        "period": "Period", "days_n": "last {n} days",
        "usage_intro": "The last 30 days, per UTC day (your bots only).",
        "answers": "Answers", "refusals": "Refusals", "errors_n": "Cut short", "tokens_in": "Tokens in",
        "tokens_out": "Tokens out", "up_share": "rated up", "votes": "Up / down", "vote_up": "up", "vote_down": "down",
        "ttft_mid": "First token, median", "ttft_top": "First token, p95",
        "wait_mid": "Queue wait, median", "wait_top": "Queue wait, p95",
        "chart_answers": "Answers, refusals and answers cut short, per day",
        "chart_tokens": "Tokens in and out, per day", "chart_ttft": "Time to first token, median and p95 (ms)",
        "chart_wait": "Queue wait, median and p95 (ms)", "chart_votes": "Answers rated up and down, per day",
        "per_bot": "Per bot", "max": "max",
        "export_title": "Export conversations",
        "export_intro": "The stored conversations of your bots, one row per message, in a date range (UTC). "
                        "CSV opens in Excel (UTF-8, formulas neutralised); JSON lines for scripts.",
        "from": "From", "to": "To", "format": "Format", "download": "Download",
        "eval_intro": "The runs of botd eval --bot NAME, newest first, each compared with the one before.",
        "no_runs": "No saved run yet: run botd eval --bot {bot} on the server.",
        "run": "Run", "questions": "questions", "hit_first": "hit@1", "hit_any": "hit@k", "refusal_ok": "refusal right",
        "facts": "facts", "median_latency": "median latency", "change": "change",
        "better": "better", "worse": "worse", "same": "same", "new": "new",
        "compared_with": "Compared with the run of {when} ({model}).",
        "first_run": "The first run: nothing to compare with.", "worse_in": "worse in",
    },
    "zh": {
        "nav_unanswered": "未答问题", "nav_usage": "用量", "nav_export": "导出", "nav_eval": "评测",
        "unanswered_intro": "你的助手因缺少文档而拒答、只凭勉强相关的文档作答、或被点踩的问题——相似的问题归为一组。"
                            "每个列表最上面的，就是下一篇该写的文档。",
        "kind_no_match": "无文档", "kind_low_score": "低分", "kind_down": "被点踩",
        "asked": "被问", "last_asked": "最近一次", "also_asked": "其他问法",
        "make_case": "设为测试用例",
        "case_added": "已加入测试集（{path}）；下次运行 botd eval 时会问到它。",
        "no_unanswered": "这里没有问题：每个问题都找到了文档。",
        "period": "时间段", "days_n": "最近 {n} 天",
        "usage_intro": "最近 30 天，按 UTC 日期（只含你的助手）。",
        "answers": "回答", "refusals": "拒答", "errors_n": "中断", "tokens_in": "输入词元",
        "tokens_out": "输出词元", "up_share": "赞占比", "votes": "赞 / 踩", "vote_up": "赞", "vote_down": "踩",
        "ttft_mid": "首字耗时中位数", "ttft_top": "首字耗时 p95",
        "wait_mid": "排队中位数", "wait_top": "排队 p95",
        "chart_answers": "每天的回答、拒答和中断的回答",
        "chart_tokens": "每天的输入与输出词元", "chart_ttft": "首字耗时，中位数与 p95（毫秒）",
        "chart_wait": "排队时间，中位数与 p95（毫秒）", "chart_votes": "每天被点赞与点踩的回答",
        "per_bot": "按助手", "max": "最大",
        "export_title": "导出会话",
        "export_intro": "你的助手保存的会话，每条消息一行，按日期范围（UTC）。CSV 可直接用 Excel 打开（UTF-8，公式已"
                        "中和）；JSON lines 供脚本使用。",
        "from": "从", "to": "到", "format": "格式", "download": "下载",
        "eval_intro": "botd eval --bot 名称 的运行记录，最新的在前，每次都与上一次比较。",
        "no_runs": "还没有保存的运行：在服务器上运行 botd eval --bot {bot}。",
        "run": "运行", "questions": "个问题", "hit_first": "首位命中", "hit_any": "前k命中", "refusal_ok": "拒答正确",
        "facts": "事实", "median_latency": "延迟中位数", "change": "变化",
        "better": "变好", "worse": "变差", "same": "相同", "new": "新增",
        "compared_with": "与 {when} 的运行（{model}）相比。",
        "first_run": "第一次运行：没有可比较的。", "worse_in": "变差于",
    },
}
