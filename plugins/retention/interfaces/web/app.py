"""The compliance page's FastAPI app: certificates, verification, status, legal holds, schedule, report.

:func:`build_app` takes everything from outside as arguments: a :class:`Deployment` (where
the audit database, rules, keys and checkpoints are) and an :class:`Access` (a FastAPI
dependency that returns the signed-in user or raises 401, and whether that user may change a
category's holds). Every route asks ``Access.authenticate`` itself: the app is mounted on
Airflow's API server without Airflow's authentication in front of it.

Pages are rendered on the server (Jinja2) and links are relative to where the app is
mounted, so it works under any prefix. Reads are GETs; placing and releasing a hold are
form POSTs, refused (403) for a user without edit access to that category.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Form, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from retention.errors import ConfigError, RetentionError, RuleError
from retention.interfaces.render import moment
from retention.interfaces.web import views

Seq = Annotated[int, Path(ge=1, le=2**63 - 1)]
"""A certificate seq or hold id in a path: the databases' BIGINT range, so a huge one is a 400, not an overflow."""

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.evidence.signing import PublicKeys
    from retention.evidence.stores import CheckpointStore
    from retention.rules.models import RuleFile
    from retention.targets import Targets

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Deployment:
    """Where the page reads from. Callables are called per request, so a fixed setting takes effect
    without a restart and a database that was down is tried again."""

    audit: Callable[[], Engine]
    """The audit database (the ``retention_audit`` connection)."""
    rules: Callable[[], list[RuleFile]]
    """The rules, for categories, targets and the schedule."""
    rules_dir: str
    """The rules directory, as ``retention hold add --rules`` takes it."""
    keys: Callable[[], PublicKeys | None]
    """The public keys verification trusts; None when none are configured."""
    checkpoints: Callable[[], list[CheckpointStore]]
    """The signed checkpoint stores kept outside the database (empty: none configured)."""
    log_id: Callable[[], str]
    """The log identity checkpoints must name."""
    targets: Callable[[], Targets]
    """A Targets on the target connections, for the status page (closed after each request)."""
    s3_client: Callable[[str], Any]
    """An S3 client for an AWS connection id (archives)."""
    archive_connection: str = "aws_default"
    clock: Callable[[], datetime] = _utc_now


@dataclass(frozen=True)
class Access:
    """Who is asking, and what they may change."""

    authenticate: Callable[..., Any]
    """A FastAPI dependency: the signed-in user, else it raises HTTPException 401 (or 403)."""
    may_edit: Callable[[Any, str], bool]
    """May this user place and release holds of this category?"""
    name_of: Callable[[Any], str] = field(default=lambda user: str(user))
    """The user's name, recorded as who placed or released a hold."""
    login_url: Callable[[str], str] = field(default=lambda next_url: "")
    """Where a person signs in, coming back to ``next_url`` after."""
    public_hosts: Callable[[], set[str]] = field(default=set)
    """The host[:port]s people reach the page at, besides the request's Host (a proxy may rewrite it)."""


def build_app(deployment: Deployment, access: Access) -> FastAPI:
    """The compliance page app; mount it anywhere (Airflow's plugin mounts it at ``/retention``)."""
    app = FastAPI(title="Retention: compliance", docs_url=None, redoc_url=None, openapi_url=None)
    pages = _Pages()

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        login = access.login_url(str(request.url.path)) if exc.status_code == 401 else ""
        return pages.render(request, "error.html", exc.status_code, title=_TITLES.get(exc.status_code, "Error"),
                            message=str(exc.detail), login=login)

    @app.exception_handler(ConfigError)
    async def misconfigured(request: Request, exc: ConfigError) -> Response:
        return pages.render(request, "error.html", 503, title="Not configured", message=str(exc), login="")

    @app.exception_handler(RuleError)
    async def bad_rules(request: Request, exc: RuleError) -> Response:
        return pages.render(request, "error.html", 503, title="The rules do not load",
                            message="; ".join(str(p) for p in exc.problems[:5]), login="")

    @app.exception_handler(RetentionError)
    async def failed(request: Request, exc: RetentionError) -> Response:
        return pages.render(request, "error.html", 500, title="Could not finish", message=str(exc), login="")

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> Response:
        return pages.render(request, "error.html", 400, title="Bad request", message=_invalid(exc), login="")

    _unreachable_handlers(app, pages)

    @app.middleware("http")
    async def guarded(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.update(_SECURITY_HEADERS)
        return response

    _evidence_routes(app, deployment, access, pages)
    _hold_routes(app, deployment, access, pages)
    _schedule_routes(app, deployment, access, pages)
    return app


class _Pages:
    """The templates, rendered with ``base``: the path the app is mounted at, for links."""

    def __init__(self) -> None:
        self.templates = Environment(loader=PackageLoader("retention.interfaces", "templates/ui"),
                                     autoescape=select_autoescape(default=True, default_for_string=True))
        self.templates.filters["moment"] = moment

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        """The page ``template`` as an HTML response."""
        here = _SECTIONS.get(template, "")
        html = self.templates.get_template(template).render(base=_base(request), here=here, **context)
        return HTMLResponse(html, status_code=status_code)


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _evidence_routes(app: FastAPI, deployment: Deployment, access: Access, pages: _Pages) -> None:
    """Certificates (list, one in full, its raw payload), verify now, and the status per target."""
    signed_in = Depends(access.authenticate)

    @app.get("/", response_class=HTMLResponse)
    def certificates(request: Request, category: str = "", status: str = "", since: str = "", until: str = "",
                     user: Any = signed_in) -> HTMLResponse:
        chosen = views.CertificateFilter(category=category or None, status=status or None,
                                         since=_day(since, "from"), until=_day(until, "to"))
        rows = views.certificate_rows(deployment.audit(), chosen)
        return pages.render(request, "certificates.html", user=access.name_of(user), rows=rows, chosen=chosen,
                            categories=_categories(deployment), statuses=views.STATUSES,
                            full=len(rows) >= chosen.limit)

    @app.get("/certificates/{seq}", response_class=HTMLResponse)
    def certificate(request: Request, seq: Seq, user: Any = signed_in) -> HTMLResponse:
        from retention.holds import HoldRegistry

        engine = deployment.audit()
        found = _certificate(engine, seq)
        detail, unreadable = None, found.problem
        if unreadable is None:
            try:
                detail = views.certificate_detail(found, HoldRegistry(engine))
            except views.NotACertificate as exc:
                unreadable = str(exc)
        return pages.render(request, "certificate.html", user=access.name_of(user), certificate=detail, seq=seq,
                            unreadable=unreadable)

    @app.get("/certificates/{seq}/payload")
    def payload(seq: Seq, user: Any = signed_in) -> Response:
        found = _certificate(deployment.audit(), seq)
        if not isinstance(found.payload, str):
            raise HTTPException(409, f"certificate {seq}: {found.problem}")
        # The exact signed bytes, so a download verifies against the signature beside it.
        signed = {"X-Retention-Signature": found.signature, "X-Retention-Key-Id": found.key_id}
        return Response(found.payload.encode("utf-8"), media_type="application/json", headers={
            # A planted row's line break or non-Latin-1 would inject a header or fail the response:
            # such a value is left out (the certificate's page shows it, escaped).
            **{name: str(value) for name, value in signed.items() if _HEADER_VALUE.fullmatch(str(value))},
            "Content-Disposition": f'inline; filename="certificate-{seq}.json"'})

    @app.get("/verify", response_class=HTMLResponse)
    def verify(request: Request, run: bool = False, archives: bool = False, user: Any = signed_in) -> HTMLResponse:
        keys = deployment.keys()
        result = None
        if keys is not None and run:
            client = (lambda: deployment.s3_client(deployment.archive_connection)) if archives else None
            result = views.verify_now(deployment.audit(), keys, deployment.checkpoints(), deployment.log_id(),
                                      archives=client)
        return pages.render(request, "verify.html", user=access.name_of(user), result=result, archives=archives,
                            configured=keys is not None)

    @app.get("/status", response_class=HTMLResponse)
    def status(request: Request, user: Any = signed_in) -> HTMLResponse:
        with deployment.targets() as targets:
            rows, skipped = views.status_rows(deployment.rules(), deployment.audit(), targets, deployment.clock())
        return pages.render(request, "status.html", user=access.name_of(user), rows=rows, skipped=skipped)


def _hold_routes(app: FastAPI, deployment: Deployment, access: Access, pages: _Pages) -> None:
    """Legal holds: in force and history; placing and releasing one (edit access to its category)."""
    from retention.holds import HoldRegistry

    signed_in = Depends(access.authenticate)

    def holds_page(request: Request, user: Any, status_code: int = 200, **context: Any) -> HTMLResponse:
        rules = deployment.rules()
        context.setdefault("form", {})
        return pages.render(request, "holds.html", status_code, user=access.name_of(user),
                            holds=views.hold_rows(HoldRegistry(deployment.audit())),
                            rules=sorted((r.rule for r in rules), key=lambda r: r.category),
                            editable={r.rule.category for r in rules if access.may_edit(user, r.rule.category)},
                            **context)

    def allowed(user: Any, category: str) -> None:
        if not access.may_edit(user, category):
            raise HTTPException(403, f"{access.name_of(user)} may not change holds of category {category!r} "
                                     f"(that needs edit access to the DAG retention__{category})")

    @app.get("/holds", response_class=HTMLResponse)
    def holds(request: Request, placed: int | None = None, released: int | None = None,
              user: Any = signed_in) -> HTMLResponse:
        return holds_page(request, user, placed=placed, released=released)

    @app.post("/holds", response_class=HTMLResponse)
    def place(request: Request, category: Annotated[str, Form()], case_id: Annotated[str, Form()] = "",
              reason: Annotated[str, Form()] = "", target: Annotated[str, Form()] = "",
              match: Annotated[str, Form()] = "", prefix: Annotated[str, Form()] = "",
              until: Annotated[str, Form()] = "", user: Any = signed_in) -> Response:
        _same_origin(request, access)
        allowed(user, category)
        wanted = views.HoldRequest(category=category, case_id=case_id, reason=reason, target=target, match=match,
                                   prefix=prefix, until=until)
        try:
            hold, warnings = views.place_hold(HoldRegistry(deployment.audit()), wanted,
                                              rules_dir=deployment.rules_dir, by=access.name_of(user))
        except ConfigError as exc:
            return holds_page(request, user, 400, problem=str(exc), form=vars(wanted))
        for warning in warnings:
            log.info("hold %s: %s", hold.id, warning)
        return RedirectResponse(f"{_base(request)}/holds?placed={hold.id}", status_code=303)

    @app.post("/holds/{hold_id}/release", response_class=HTMLResponse)
    def release(request: Request, hold_id: Seq, reason: Annotated[str, Form()] = "",
                user: Any = signed_in) -> Response:
        _same_origin(request, access)
        registry = HoldRegistry(deployment.audit())
        try:
            category = registry.get(hold_id).category
        except ConfigError as exc:
            raise HTTPException(404, str(exc)) from None
        allowed(user, category)
        try:
            registry.release(hold_id, reason=reason, by=access.name_of(user))
        except ConfigError as exc:
            return holds_page(request, user, 400, problem=str(exc))
        return RedirectResponse(f"{_base(request)}/holds?released={hold_id}", status_code=303)


def _schedule_routes(app: FastAPI, deployment: Deployment, access: Access, pages: _Pages) -> None:
    """The published retention schedule, and the period report an auditor files."""
    signed_in = Depends(access.authenticate)

    @app.get("/schedule", response_class=HTMLResponse)
    def schedule(request: Request, user: Any = signed_in) -> HTMLResponse:
        from retention.interfaces.schedule import schedule_entries

        first = deployment.clock().date().replace(day=1)
        previous = (first - timedelta(days=1)).replace(day=1)
        return pages.render(request, "schedule.html", user=access.name_of(user),
                            entries=schedule_entries(deployment.rules()), since=previous.isoformat(),
                            until=first.isoformat())

    @app.get("/report")
    def report(since: Annotated[str, Query()] = "", until: Annotated[str, Query()] = "",
               format: str = "html", user: Any = signed_in) -> Response:
        from retention.evidence.checkpoints import read_all
        from retention.holds import HoldRegistry
        from retention.interfaces.report import FORMATS, build_report, render

        if format not in FORMATS:
            raise HTTPException(400, f"format {format!r}: use one of {', '.join(FORMATS)}")
        start, end = _day(since, "since"), _day(until, "until")
        if start is None or end is None:
            raise HTTPException(400, "give the period: since and until (YYYY-MM-DD; until is excluded)")
        if end <= start:
            raise HTTPException(400, f"until ({end}) must be after since ({start}): until is the first day left out")
        engine, keys = deployment.audit(), deployment.keys()
        checkpoints = read_all(deployment.checkpoints(), keys, deployment.log_id()) if keys is not None else {}
        built = build_report(engine, since=views.midnight(start), until=views.midnight(end),
                             now=deployment.clock(), rules=deployment.rules(), keys=keys, checkpoints=checkpoints,
                             holds=HoldRegistry(engine))
        media = {"html": "text/html", "csv": "text/csv", "json": "application/json"}[format]
        return Response(render(built, format), media_type=f"{media}; charset=utf-8")


_SECTIONS = {"certificates.html": "certificates", "certificate.html": "certificates", "verify.html": "verify",
             "status.html": "status", "holds.html": "holds", "schedule.html": "schedule"}
"""The nav entry each page belongs to."""

_TITLES = {400: "Bad request", 401: "Sign in first", 403: "Not allowed", 404: "Not found", 409: "Unreadable"}


def _certificate(engine: Engine, seq: int):
    found = views.find_by_seq(engine, seq)
    if found is None:
        raise HTTPException(404, f"there is no certificate {seq}")
    return found


def _categories(deployment: Deployment) -> list[str]:
    try:
        return sorted(r.rule.category for r in deployment.rules())
    except RuleError:  # the listing still works; the filter offers what the rules would have
        return []


def _day(text: str, what: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise HTTPException(400, f"{what}: {_clip(text)!r} is not a date; write YYYY-MM-DD") from None


def _clip(text: str, most: int = 40) -> str:
    """Echo at most ``most`` characters of what was typed: a megabyte of query string stays out of the page."""
    return text if len(text) <= most else text[:most] + "…"


def _invalid(exc: RequestValidationError) -> str:
    """A validation failure in one line per parameter: which one, what was given, what is wanted."""
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request"
        given = error.get("input")
        shown = f" {_clip(str(given))!r}" if isinstance(given, (str, int)) else ""
        problems.append(f"{where}{shown}: {error.get('msg', 'invalid')}")
    return "; ".join(problems)


def _same_origin(request: Request, access: Access) -> None:
    """Refuse a form a browser may have posted from another site.

    A browser adds the ``_token`` cookie to any request to this host by itself (SameSite=Lax still
    lets a sibling subdomain's page post), so a cookie-signed form must show it came from this
    origin: Origin, or Referer when a browser leaves Origin out; an opaque ``null`` origin
    (sandboxed frames, data: URLs) proves nothing. A bearer token is never added by a browser,
    so a request carrying one is the API client's own."""
    ours = {request.url.netloc} | access.public_hosts()
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc not in ours:
            raise HTTPException(403, f"a form from {_clip(origin, 80)} may not change holds here")
        return
    claimed = request.headers.get("origin") or request.headers.get("referer") or ""
    if not claimed or claimed == "null":
        raise HTTPException(403, "this form did not say where it came from (no Origin or Referer): "
                                 "place and release holds from the retention page itself")
    if urlsplit(claimed).netloc not in ours:
        raise HTTPException(403, f"a form from {_clip(claimed, 80)} may not change holds here")


_HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,1024}")
"""What a signature or key id may be to go into a header: visible ASCII (base64, ids), one line."""

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # the raw payload is JSON a planted row could fill with markup
    "X-Frame-Options": "SAMEORIGIN",  # the Airflow UI frames the page from its own origin; nobody else may
    # No script at all: the pages are plain HTML, so an injected one cannot run even if escaping failed.
    "Content-Security-Policy": "default-src 'none'; script-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'self'; base-uri 'none'",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # hold scopes name people: no copy in a shared cache or the back button
}


def _unreachable_handlers(app: FastAPI, pages: _Pages) -> None:
    """A database or S3 that cannot be reached is a 503 that says which, in one line without secrets."""
    from botocore.exceptions import BotoCoreError, ClientError
    from sqlalchemy.exc import SQLAlchemyError

    async def database(request: Request, exc: Exception) -> Response:
        log.warning("retention page: a database failed: %s", exc)
        from retention.connections import failed_connection

        cause = getattr(exc, "orig", None) or exc
        conn_id = failed_connection(exc)
        # Which one: its connection id, and the driver's line (host, port); a hold's scope check also
        # reads its target's table.
        which = f"connection {conn_id}" if conn_id else "the audit database (or the target a hold is checked against)"
        return pages.render(request, "error.html", 503, title="A database cannot be reached",
                            message=f"{which} failed: {_one_line(cause)}", login="")

    async def storage(request: Request, exc: Exception) -> Response:
        log.warning("retention page: S3 failed: %s", exc)
        return pages.render(request, "error.html", 503, title="S3 cannot be reached",
                            message=f"the checkpoint or archive store failed: {_one_line(exc)}", login="")

    app.add_exception_handler(SQLAlchemyError, database)
    app.add_exception_handler(BotoCoreError, storage)
    app.add_exception_handler(ClientError, storage)


def _one_line(exc: BaseException) -> str:
    """The first line of an error, with any ``user:password@`` in a URL it quotes masked."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", first)[:300]
