"""What the bots layer says to a chat user, in Chinese and English."""

from __future__ import annotations

KNOWLEDGE_LOADING = ("我的知识库还在加载中，请 {s} 秒后再问一次。\n"
                     "My knowledge base is still loading; please ask again in {s} s.")
