"""Which bot answers a platform message: the ``[[routes]]`` rules, then the account's own routes.

Order (first match wins):

1. ``[[routes]]`` in config.toml, top to bottom: a rule matches when every condition it gives
   holds (platform, account, chat, user, department, a regular expression on the text); a
   list condition holds when it contains the message's value;
2. the connector section's own ``routes`` (chat / channel / user id -> bot);
3. the bot named like the connector section.

Departments are asked of the platform (WeCom) only when a rule that names departments is
reached, and at most once per message.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache

from core.config import RouteConfig
from core.messages import Account, InboundMessage


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


async def route(rules: Sequence[RouteConfig], msg: InboundMessage, account: Account,
                departments: Callable[[], Awaitable[Sequence[str]]] | None = None) -> str:
    """The bot that answers ``msg``, received by ``account``. ``departments`` gives the user's
    department ids (called at most once, only when a rule needs them; a failure counts as none)."""
    groups: set[str] | None = None
    for rule in rules:
        if rule.platform and msg.platform not in rule.platform:
            continue
        if rule.account and account.name not in rule.account:
            continue
        if rule.chat and msg.chat not in rule.chat:
            continue
        if rule.user and msg.user not in rule.user:
            continue
        if rule.pattern and not _compiled(rule.pattern).search(msg.text if msg.readable else ""):
            continue
        if rule.department:
            if groups is None:
                groups = set()
                if departments is not None:
                    try:
                        groups = {str(g) for g in await departments()}
                    except Exception:  # the lookup failed: no department rule matches
                        groups = set()
            if not groups.intersection(rule.department):
                continue
        return rule.bot
    return account.bot_for(msg.chat)
