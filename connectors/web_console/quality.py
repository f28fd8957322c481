"""The console's pages of a department's quality loop: what the bots could not answer, usage,
the conversation export and ``botd eval``'s runs with their diffs, and a question turned into
a test case with one click.

Mixed into :class:`~connectors.web_console.connector.WebConsoleConnector`, with the same roles:
a department user (and a viewer limited to some bots) sees only its own bots and the bases they
read, 403 otherwise; adding a test case takes a role that may write (admin, department) and the
login's CSRF token. The login checks (``_page`` / ``_api``) are the connector's, looked up when
a request comes in (this module is imported by the connector's, not the other way round).
"""

from __future__ import annotations

import functools
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

from aiohttp import web

from connectors.base import Route
from connectors.web_console.csvsafe import BOM, line

if TYPE_CHECKING:
    from connectors.web_console.connector import Session

_Handler = Callable[[Any, web.Request, "Session"], Awaitable[web.StreamResponse]]
_Wrapped = Callable[[Any, web.Request], Awaitable[web.StreamResponse]]
DAYS_CHOICES = (7, 30, 90)
EXPORT_COLUMNS = ("ts", "conversation", "platform", "bot", "chat", "thread", "role", "content")
UNANSWERED_COLUMNS = ("kb", "question", "count", "last_asked", "no_match", "low_score", "down", "bots", "variants")


def _page(handler: _Handler) -> _Wrapped:
    @functools.wraps(handler)
    async def wrapped(self: Any, request: web.Request) -> web.StreamResponse:
        from connectors.web_console import connector

        return await connector._page(handler)(self, request)

    return wrapped


def _api(write: bool = False) -> Callable[[_Handler], _Wrapped]:
    def deco(handler: _Handler) -> _Wrapped:
        @functools.wraps(handler)
        async def wrapped(self: Any, request: web.Request) -> web.StreamResponse:
            from connectors.web_console import connector

            return await connector._api(write)(handler)(self, request)

        return wrapped

    return deco


def _refuse(status: int, code: str, message: str) -> NoReturn:
    from connectors.web_console import connector

    raise connector._Refused(status, code, message)


def _json(data: Any, status: int = 200) -> web.Response:
    from connectors.web_console import connector

    return connector._json(data, status)


def _headers() -> dict[str, str]:
    from connectors.web_console import connector

    return dict(connector._SECURITY_HEADERS)


def _days(request: web.Request, default: int = 30) -> int:
    raw = request.query.get("days", str(default))
    if not raw.isdigit() or int(raw) not in DAYS_CHOICES:
        _refuse(400, "invalid_days", f"days: one of {', '.join(map(str, DAYS_CHOICES))}")
    return int(raw)


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
        kb = request.query.get("kb", "")
        kbs = [self._kb(session, kb)] if kb else self._kbs_of(session, list(session.bots))
        groups = await self.admin.unanswered(session.bots, kbs, days=days)
        return kbs, groups, days

    @_page
    async def unanswered_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        kbs, groups, days = await self._unanswered(session, request)
        return self._render(request, "unanswered.html", session, kbs=kbs, groups=groups, days=days,
                            days_choices=DAYS_CHOICES, all_kbs=self._kbs_of(session, list(session.bots)),
                            kb=request.query.get("kb", ""), notice=request.query.get("notice", ""),
                            notice_path=request.query.get("path", ""))

    @_api()
    async def api_unanswered(self, request: web.Request, session: Session) -> web.StreamResponse:
        kbs, groups, days = await self._unanswered(session, request)
        return _json({"days": days, "knowledge": [{"kb": kb, "groups": groups.get(kb, [])} for kb in kbs]})

    @_api()
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
            **_headers(), "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="botd-unanswered-{_stamp()}.csv"'})

    # -- usage ---------------------------------------------------------------------------------------

    @_page
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

    @_api()
    async def api_usage(self, request: web.Request, session: Session) -> web.StreamResponse:
        return _json(await self.admin.usage(self._bots_asked(session, request)))

    # -- conversation export -------------------------------------------------------------------------

    @_page
    async def export_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        today = time.strftime("%Y-%m-%d", time.gmtime())
        month_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 30 * 86400))
        return self._render(request, "export.html", session, today=today, month_ago=month_ago)

    @_api()
    async def api_export(self, request: web.Request, session: Session) -> web.StreamResponse:
        from bots.export import ExportError, day_range

        bots = self._bots_asked(session, request)
        fmt = request.query.get("format", "csv")
        if fmt not in ("csv", "jsonl"):
            _refuse(400, "invalid_format", "format: csv or jsonl")
        try:
            since, until = day_range(request.query.get("from", ""), request.query.get("to", ""))
        except ExportError as exc:
            _refuse(400, "invalid_range", str(exc))
        rows: AsyncIterator[dict[str, Any]] = self.admin.export_rows(bots, since, until)
        resp = web.StreamResponse(headers={
            **_headers(), "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else
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

    @_page
    async def eval_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = self._bot(session, request.query.get("bot") or None) if session.bots else ""
        runs = await self.admin.eval_runs(bot) if bot else []
        name = request.query.get("run", "") or (runs[0]["name"] if runs else "")
        run = await self.admin.eval_run(bot, name) if bot and name else None
        if request.query.get("run") and run is None:
            _refuse(404, "not_found", f"no run {name!r} of {bot!r}")
        return self._render(request, "eval.html", session, bot=bot, runs=runs, run=run)

    @_api()
    async def api_eval(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = self._bot(session, request.query.get("bot") or None)
        return _json({"bot": bot, "runs": await self.admin.eval_runs(bot)})

    @_api()
    async def api_eval_run(self, request: web.Request, session: Session) -> web.StreamResponse:
        bot = self._bot(session, request.query.get("bot") or None)
        run = await self.admin.eval_run(bot, request.query.get("run", ""))
        if run is None:
            _refuse(404, "not_found", "no such run")
        return _json(run)

    @_api(write=True)
    async def api_eval_case(self, request: web.Request, session: Session) -> web.StreamResponse:
        from bots.eval import CaseNotAdded

        fields = await self._fields(request)
        bot = self._bot(session, fields.get("bot") or "-")
        if not session.can_write:
            _refuse(403, "forbidden", f"the role {session.role!r} may only read")
        question = fields.get("q", "")
        try:
            path = await self.admin.add_eval_case(bot, question)
        except CaseNotAdded as exc:
            _refuse(exc.status, "case_not_added", str(exc))
        name = path.rsplit("/", 1)[-1]  # the set's file name: where it lives is the admin's business
        self.admin.audit_action(session.name, "eval_case_added", bot=bot, set=path, chars=len(question))
        if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            back = fields.get("back", "")
            if not back.startswith(self.base + "/unanswered") or "//" in back:
                back = self.base + "/unanswered"
            sep = "&" if "?" in back else "?"
            return web.Response(status=303, headers={**_headers(), "Location": f"{back}{sep}notice=case_added&"
                                                     f"path={urllib.parse.quote(name)}"})
        return _json({"bot": bot, "set": name, "q": question}, status=201)


def _iso(ts: float | None) -> str:
    return "" if not ts else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())

