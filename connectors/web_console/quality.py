"""The console's pages of a department's quality loop: what the bots could not answer, usage,
the conversation export and ``botd eval``'s runs with their diffs, and a question turned into
a test case with one click.

Mixed into :class:`~connectors.web_console.connector.WebConsoleConnector`, with the same roles:
a department user (and a viewer limited to some bots) sees only its own bots and the bases they
read, 403 otherwise; adding a test case takes a role that may write (admin, department) and the
login's CSRF token. The handlers here take the checked session; the connector puts them behind
its login checks (:data:`HANDLERS`: a page, a read or a write) and lends the few helpers they
use (``_bot``, ``_kb``, ``_render``, ``_refuse`` ...), so this module imports nothing of it.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, Protocol

from aiohttp import web

from connectors.base import Route
from connectors.web_console.backend import BackendRefusal
from connectors.web_console.csvsafe import BOM, line


class Session(Protocol):
    """What the handlers read of the connector's checked login (its ``Session``)."""

    name: str
    bots: tuple[str, ...]
    csrf: str

    @property
    def role(self) -> str: ...

    @property
    def can_write(self) -> bool: ...

DAYS_CHOICES = (7, 30, 90)
EXPORT_COLUMNS = ("ts", "conversation", "platform", "bot", "chat", "thread", "role", "content")
UNANSWERED_COLUMNS = ("kb", "question", "count", "last_asked", "no_match", "low_score", "down", "bots", "variants")


def _days(request: web.Request, default: int = 30) -> int | None:
    """``?days=``, or None when it is not one of :data:`DAYS_CHOICES`."""
    raw = request.query.get("days", str(default))
    return int(raw) if raw.isdigit() and int(raw) in DAYS_CHOICES else None


def bars(days: list[dict[str, Any]], keys: tuple[str, ...], width: int = 600, height: int = 120,
         ) -> dict[str, Any]:
    """A small stacked bar chart as numbers for an inline SVG: one bar per day, one rect per key."""
    n = max(1, len(days))
    top = max([sum((d.get(k) or 0) for k in keys) for d in days] + [0])
    step = width / n
    rects = []
    for i, d in enumerate(days):
        y = float(height)
        for j, k in enumerate(keys):
            v = d.get(k) or 0
            h = height * v / top if top else 0
            if h > 0:
                y -= h
                rects.append({"x": round(i * step + 1, 1), "y": round(y, 1), "w": round(max(step - 2, 1), 1),
                              "h": round(h, 1), "series": j, "title": f"{d['day']} {k}: {v}"})
    return {"rects": rects, "max": top, "width": width, "height": height,
            "first": days[0]["day"] if days else "", "last": days[-1]["day"] if days else "", "keys": keys}


def lines(days: list[dict[str, Any]], keys: tuple[str, ...], width: int = 600, height: int = 120,
          ) -> dict[str, Any]:
    """Polylines (one per key) for an inline SVG; a day without a value breaks no line: it is skipped."""
    n = max(1, len(days) - 1)
    top = max([(d.get(k) or 0) for d in days for k in keys] + [0])
    polys = []
    for j, k in enumerate(keys):
        pts = [f"{round(width * i / n, 1)},{round(height - (height * d[k] / top if top else 0), 1)}"
               for i, d in enumerate(days) if d.get(k) is not None]
        polys.append({"series": j, "points": " ".join(pts), "key": k})
    return {"polys": polys, "max": top, "width": width, "height": height,
            "first": days[0]["day"] if days else "", "last": days[-1]["day"] if days else "", "keys": keys}


# Each handler, and the login check the connector puts it behind: "page" (an HTML page), "read"
# (a JSON or file endpoint) or "write" (a JSON endpoint that needs the login's CSRF token).
HANDLERS = {
    "unanswered_page": "page", "api_unanswered": "read", "api_unanswered_csv": "read",
    "usage_page": "page", "api_usage": "read", "export_page": "page", "api_export": "read",
    "eval_page": "page", "api_eval": "read", "api_eval_run": "read", "api_eval_case": "write",
}


class QualityPages:
    """Routes and handlers of the quality pages (a mixin of the console connector)."""

    # Provided by the connector.
    base: str
    admin: Any
    config: Any
    _bot: Callable[..., str]
    _kb: Callable[..., str]
    _render: Callable[..., web.Response]
    _fields: Callable[[web.Request], Awaitable[dict[str, str]]]
    _refuse: Callable[[int, str, str], NoReturn]
    _reply_json: Callable[..., web.Response]
    _headers: Callable[[], dict[str, str]]

    def quality_routes(self) -> list[Route]:
        p = self.base
        return [
            ("GET", p + "/unanswered", "unanswered_page"), ("GET", p + "/api/unanswered", "api_unanswered"),
            ("GET", p + "/api/unanswered.csv", "api_unanswered_csv"),
            ("GET", p + "/usage", "usage_page"), ("GET", p + "/api/usage", "api_usage"),
            ("GET", p + "/export", "export_page"), ("GET", p + "/api/export", "api_export"),
            ("GET", p + "/eval", "eval_page"), ("GET", p + "/api/eval", "api_eval"),
            ("GET", p + "/api/eval/run", "api_eval_run"), ("POST", p + "/api/eval/case", "api_eval_case"),
        ]

    # -- which bots and bases ------------------------------------------------------------------------

    def _bots_asked(self, session: Session, request: web.Request) -> list[str]:
        bot = request.query.get("bot") or None
        return [self._bot(session, bot)] if bot else list(session.bots)

    def _kbs_of(self, session: Session, bots: list[str]) -> list[str]:
        cfg = self.config
        return sorted({kb for b in bots if b in cfg.bots for kb in cfg.bots[b].knowledge if kb in cfg.knowledge})

    # -- unanswered ----------------------------------------------------------------------------------

    async def _unanswered(self, session: Session, request: web.Request) -> tuple[list[str], dict[str, Any], int]:
        days = _days(request, 30)
        if days is None:
            self._refuse(400, "invalid_days", f"days: one of {', '.join(map(str, DAYS_CHOICES))}")
        kb = request.query.get("kb", "")
        kbs = [self._kb(session, kb)] if kb else self._kbs_of(session, list(session.bots))
        groups = await self.admin.unanswered(session.bots, kbs, days=days)
        return kbs, groups, days

    async def unanswered_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        kbs, groups, days = await self._unanswered(session, request)
        return self._render(request, "unanswered.html", session, kbs=kbs, groups=groups, days=days,
                            days_choices=DAYS_CHOICES, all_kbs=self._kbs_of(session, list(session.bots)),
                            kb=request.query.get("kb", ""), notice=request.query.get("notice", ""),
                            # The set's name, never a text a link brings along.
                            notice_path=next((n for n in ("eval.toml", "eval.jsonl")
                                              if request.query.get("path") == n), ""))

    async def api_unanswered(self, request: web.Request, session: Session) -> web.StreamResponse:
        kbs, groups, days = await self._unanswered(session, request)
        return self._reply_json({"days": days, "knowledge": [{"kb": kb, "groups": groups.get(kb, [])} for kb in kbs]})

    async def api_unanswered_csv(self, request: web.Request, session: Session) -> web.StreamResponse:
        kbs, groups, days = await self._unanswered(session, request)
        out = [BOM + line(UNANSWERED_COLUMNS)]
        for kb in kbs:
            for g in groups.get(kb, []):
                out.append(line((kb, g["question"], g["count"], _iso(g["last_at"]), g["kinds"]["no_match"],
                                 g["kinds"]["low_score"], g["kinds"]["down"], " ".join(g["bots"]),
                                 " | ".join(v["question"] for v in g["variants"]))))
        self.admin.audit_action(session.name, "unanswered_export", knowledge=kbs, days=days)
        return web.Response(body="".join(out).encode(), headers={
            **self._headers(), "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="botd-unanswered-{_stamp()}.csv"'})

    # -- usage ---------------------------------------------------------------------------------------

    async def usage_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        bots = self._bots_asked(session, request)
        u = await self.admin.usage(bots)
        days = u["days"]
        charts = {
            "answers": bars(days, ("answers", "refusals", "errors")),
            "tokens": bars(days, ("tokens_in", "tokens_out")),
            "ttft": lines(days, ("ttft_p50_ms", "ttft_p95_ms")),
            "wait": lines(days, ("wait_p50_ms", "wait_p95_ms")),
            "votes": bars(days, ("up", "down")),
        }
        return self._render(request, "usage.html", session, usage=u, charts=charts, bot=request.query.get("bot", ""))

    async def api_usage(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._reply_json(await self.admin.usage(self._bots_asked(session, request)))

    # -- conversation export -------------------------------------------------------------------------

    async def export_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        month_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 30 * 86400))
        return self._render(request, "export.html", session, today=today, month_ago=month_ago)

    async def api_export(self, request: web.Request, session: Session) -> web.StreamResponse:
        bots = self._bots_asked(session, request)
        fmt = request.query.get("format", "csv")
        if fmt not in ("csv", "jsonl"):
            self._refuse(400, "invalid_format", "format: csv or jsonl")
        try:
            rows: AsyncIterator[dict[str, Any]] = self.admin.export_rows(
                bots, request.query.get("from", ""), request.query.get("to", ""))
        except BackendRefusal as exc:
            self._refuse(exc.status, "invalid_range", exc.message)
        resp = web.StreamResponse(headers={
            **self._headers(), "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else
            "application/x-ndjson; charset=utf-8",
            "Content-Disposition": f'attachment; filename="botd-conversations-{_stamp()}.{fmt}"'})
        n = 0
        try:
            await resp.prepare(request)
            if fmt == "csv":
                await resp.write((BOM + line(EXPORT_COLUMNS)).encode())
            async for row in rows:
                if fmt == "csv":
                    await resp.write(line(row.get(c) for c in EXPORT_COLUMNS).encode())
                else:
                    await resp.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
                n += 1
            await resp.write_eof()
        finally:
            # Written even when the download broke off: who took which bots' conversations, how many rows.
            self.admin.audit_action(session.name, "conversation_export", bots=bots, format=fmt, rows=n,
                                    **{k: request.query[k] for k in ("from", "to") if request.query.get(k)})
        return resp

    # -- eval runs -----------------------------------------------------------------------------------

    async def eval_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = self._bot(session, request.query.get("bot") or None) if session.bots else ""
        runs = await self.admin.eval_runs(bot) if bot else []
        name = request.query.get("run", "") or (runs[0]["name"] if runs else "")
        run = await self.admin.eval_run(bot, name) if bot and name else None
        if request.query.get("run") and run is None:
            self._refuse(404, "not_found", f"no run {name!r} of {bot!r}")
        return self._render(request, "eval.html", session, bot=bot, runs=runs, run=run)

    async def api_eval(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = self._bot(session, request.query.get("bot") or None)
        return self._reply_json({"bot": bot, "runs": await self.admin.eval_runs(bot)})

    async def api_eval_run(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = self._bot(session, request.query.get("bot") or None)
        run = await self.admin.eval_run(bot, request.query.get("run", ""))
        if run is None:
            self._refuse(404, "not_found", "no such run")
        return self._reply_json(run)

    async def api_eval_case(self, request: web.Request, session: Session) -> web.StreamResponse:
        fields = await self._fields(request)
        bot = self._bot(session, fields.get("bot") or "-")
        if not session.can_write:
            self._refuse(403, "forbidden", f"the role {session.role!r} may only read")
        question = fields.get("q", "")
        try:
            path = await self.admin.add_eval_case(bot, question)
        except BackendRefusal as exc:
            self._refuse(exc.status, "case_not_added", exc.message)
        name = path.rsplit("/", 1)[-1]  # the set's file name: where it lives is the admin's business
        self.admin.audit_action(session.name, "eval_case_added", bot=bot, set=path, chars=len(question))
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            # Back to the unanswered page with its filters: only those two are taken from the form.
            asked = urllib.parse.parse_qs(urllib.parse.urlsplit(fields.get("back", "")).query)
            keep = {k: asked[k][0] for k in ("kb", "days") if asked.get(k) and asked[k][0].isprintable()}
            query = urllib.parse.urlencode({**keep, "notice": "case_added", "path": name})
            return web.Response(status=303, headers={**self._headers(),
                                                     "Location": f"{self.base}/unanswered?{query}"})
        return self._reply_json({"bot": bot, "set": name, "q": question}, status=201)


def _iso(ts: float | None) -> str:
    return "" if not ts else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())

