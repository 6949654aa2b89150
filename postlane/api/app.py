"""The HTTP API as a FastAPI application: `create_app` builds it around a `PostlaneClient`.

Every route is a thin layer over the Python API, so an email sent over HTTP is the same
workflow, with the same idempotency and validation, as one sent from Python or the CLI.
Bodies are read here (bounded by ``[api] max_body_bytes``) and validated with Postlane's
own models; every error is a problem document (`postlane.api.problems`).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin
from urllib.parse import parse_qs

import structlog
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from postlane.client import CancelResult, PostlaneClient
from postlane.email.models import Attachment, Email, EmailReport, Priority
from postlane.errors import ConfigurationError, InvalidInput
from postlane.idempotency import email_digest
from postlane.ids import SEQUENCE_ID_PREFIX, email_workflow_id, sequence_workflow_id
from postlane.lanes.guard import LanePause
from postlane.lanes.models import LaneReport
from postlane.senders import sender_of
from postlane.sequences.directory import SpecDirectory
from postlane.sequences.models import SequenceReport
from postlane.sequences.spec import Recipient
from postlane.tokens import TokenKeys

from .idempotency import HEADER, InFlight, require_key
from .keys import ApiKey, KeyStore
from .problems import (
    MEDIA_TYPE,
    Problem,
    ProblemDetails,
    field_errors,
    from_field_errors,
    install,
    invalid,
)

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)

_EXTRA_FORBIDDEN = "Extra inputs are not permitted"


# The request bodies refuse fields they do not know (422 naming the field): a misspelt
# ``sendAt`` must not send at once. Postlane's own models (`Email`, `Recipient`) keep
# ignoring extra fields, as wire models that older workers read must.
_STRICT = ConfigDict(extra="forbid")


class AttachmentBody(Attachment):
    """A small file sent inline with the email (the whole email stays under 1 MB): the
    fields of Postlane's `Attachment`, and no others."""

    model_config = _STRICT


class SendEmailRequest(Email):
    """``POST /v1/emails``: the email (the fields of Postlane's `Email`) and how to send it."""

    model_config = _STRICT

    attachments: list[AttachmentBody] = Field(default_factory=list)  # type: ignore[assignment]
    """Files sent with the email."""
    priority: Priority = Priority.NORMAL
    """``high``, ``normal`` or ``bulk``."""
    send_at: AwareDatetime | None = None
    """When to send (ISO 8601 with a zone); absent sends now."""

    def email(self) -> Email:
        """The `Email` part."""
        fields: dict[str, Any] = {name: getattr(self, name) for name in Email.model_fields}
        fields["attachments"] = [Attachment(**a.model_dump()) for a in self.attachments]
        return Email(**fields)


class RecipientBody(Recipient):
    """One person enrolled in a sequence, with the variables its templates use: the fields
    of Postlane's `Recipient`, and no others."""

    model_config = _STRICT


class StartSequenceRequest(BaseModel):
    """``POST /v1/sequences``: enroll one recipient in a spec of the server's ``specs_dir``."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True, extra="forbid")

    spec: str = Field(
        description="The spec: <specs_dir>/<spec>.toml, the spec in specs_dir with this "
        "name, or a .toml file in specs_dir."
    )
    recipient: RecipientBody

    def enrolled(self) -> Recipient:
        """The `Recipient` part."""
        return Recipient(**self.recipient.model_dump())


class RetryBody(BaseModel):
    """``POST /v1/emails/{key}/retry``: optional corrections."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    to: list[str] | None = None
    """Replace the To recipients (a dead-lettered email only)."""
    lane: str | None = None
    """Send through another lane (a dead-lettered email only)."""


class LaneActionBody(BaseModel):
    """``POST /v1/lanes/{name}/pause`` and ``/resume``: why (kept in the lane's log)."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    reason: str = Field(default="", max_length=500)
    """Why the lane is paused or resumed (pause: shown with the pause)."""


class Accepted(BaseModel):
    """A start the API accepted: where to follow it."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    key: str
    workflow_id: str
    status_url: str


class InboundResult(BaseModel):
    """What ``POST /v1/inbound`` did with the message."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    routed: bool
    """True if it reached a sequence (a reply, bounce, auto-reply or unsubscribe)."""
    sequence: str | None = None
    """That sequence's key."""


class Health(BaseModel):
    """``GET /healthz``."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    status: str
    temporal: str
    in_flight: int
    """Requests with an Idempotency-Key being processed right now."""


_bearer = HTTPBearer(auto_error=False, description="An API key from `postlane api-key create`.")


async def authenticated(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The live API key of the request (the app's `KeyStore` is ``app.state.keys``).

    Raises:
        Problem: 401, no key, or a wrong or revoked one.
    """
    challenge = {"WWW-Authenticate": 'Bearer realm="postlane"'}
    if creds is None:
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "Authorization: send 'Authorization: Bearer <API key>'",
            field="Authorization",
            headers=challenge,
        )
    store: KeyStore = request.app.state.keys
    record = store.authenticate(creds.credentials)
    if record is None:
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "Authorization: the API key is wrong or revoked",
            field="Authorization",
            headers=challenge,
        )
    return record


Key = Annotated[ApiKey, Depends(authenticated)]
IdemHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        description="The idempotency key (the email's or sequence's key); required.",
    ),
]


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    problem = {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}
    return {
        code: {"description": "A problem (RFC 9457)", "content": {MEDIA_TYPE: problem}}
        for code in codes
    }


def create_app(pl: PostlaneClient, *, keys: KeyStore | None = None) -> FastAPI:
    """The API's FastAPI application.

    Args:
        pl: the connected client; its settings' ``[api]`` table configures the API.
        keys: the API keys (default: the ``keys_file`` of the settings).
    """
    api = pl.settings.api
    store = keys or KeyStore(api.keys_file)
    in_flight: InFlight[tuple[bool, BaseModel]] = InFlight()
    tokens: TokenKeys | None = None
    app = FastAPI(
        title="Postlane",
        version="1",
        summary="Durable outbound email for AI agents and applications.",
        description="See docs/api.md: auth, idempotency, errors and limits.",
    )
    install(app)
    app.state.keys = store

    @app.middleware("http")
    async def log_request(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        # The route's template, never the path itself: paths carry idempotency keys
        # (often built from addresses) and unsubscribe tokens.
        route = request.scope.get("route")
        log.info(
            "api.request",
            method=request.method,
            route=getattr(route, "path", "-"),
            status=response.status_code,
        )
        return response

    def check_sender(record: ApiKey, sender: str, field: str) -> None:
        if not record.allows(sender):
            raise Problem(
                403,
                "sender-forbidden",
                "Sender not allowed",
                f"{field}: this API key may not send as {sender!r}"
                f" (it may send as {', '.join(record.senders)})",
                field=field,
            )

    async def check_owner(record: ApiKey, key: str) -> None:
        # Cancel and retry act for the sender the email was started as: the same scope
        # as sending, read from the email's start on the Temporal server.
        if not record.scope.restricted:
            return
        sender = await sender_of(pl, key)
        if sender is None or not record.allows(sender):
            raise Problem(
                403,
                "sender-forbidden",
                "Sender not allowed",
                f"key: {key!r} was sent as {sender!r}; this API key may act only for"
                f" {', '.join(record.senders)}",
                field="key",
            )

    async def body_of(request: Request) -> bytes:
        limit = api.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise _too_large(len(data), limit)
        return bytes(data)

    async def optional_body(request: Request, model: type[M]) -> M:
        # An empty body means every field's default.
        raw = await body_of(request)
        return _parse(model, raw) if raw.strip() else model()

    def replayed(response: Response, joined: bool, created: bool) -> None:
        # A request that joined another in flight, or found the workflow already there,
        # answers what the first request answered.
        response.headers["Idempotent-Replayed"] = "true" if joined or not created else "false"

    @app.get("/healthz", tags=["service"])
    async def healthz(response: Response) -> Health:
        """Liveness and whether Temporal answers (503 if not)."""
        try:
            ok = await pl.temporal.service_client.check_health(timeout=timedelta(seconds=5))
        except Exception:  # any failure to reach Temporal is "not healthy", not a crash
            ok = False
        if not ok:
            response.status_code = 503
        return Health(
            status="ok" if ok else "degraded",
            temporal="ok" if ok else "unreachable",
            in_flight=len(in_flight),
        )

    @app.post(
        "/v1/emails",
        tags=["emails"],
        status_code=202,
        responses=_problems(400, 401, 403, 413, 422),
        openapi_extra=_json_body("SendEmailRequest"),
    )
    async def send_email(
        request: Request, response: Response, record: Key, idempotency_key: IdemHeader = None
    ) -> Accepted:
        """Send one email, durably, once per Idempotency-Key.

        The same key and body answer the same (``Idempotent-Replayed: true``) and never
        send twice; the same key with another body is 422.
        """
        key = require_key(idempotency_key)
        req = _parse(SendEmailRequest, await body_of(request))
        check_sender(record, req.sender, "sender")
        count = len(req.to) + len(req.cc) + len(req.bcc)
        if count > api.max_recipients:
            raise invalid(
                "to",
                f"{count} recipients is more than this API's limit of "
                f"{api.max_recipients} (to + cc + bcc)",
            )
        email = req.email()

        async def start() -> tuple[bool, BaseModel]:
            handle = await pl.send(email, key=key, priority=req.priority, send_at=req.send_at)
            log.info("api.email_accepted", key_id=record.id, workflow_id=handle.workflow_id)
            return handle.created, Accepted(
                key=key, workflow_id=email_workflow_id(key), status_url=f"/v1/emails/{key}"
            )

        (created, body), joined = await in_flight.run(
            email_workflow_id(key), email_digest(email, req.send_at), start
        )
        replayed(response, joined, created)
        response.headers["Location"] = f"/v1/emails/{key}"
        assert isinstance(body, Accepted)
        return body

    @app.post("/v1/emails/{key:path}/cancel", tags=["emails"], responses=_problems(401, 403, 404))
    async def cancel_email(key: str, record: Key) -> CancelResult:
        """Cancel an email that has not gone out (an email already sent says so); 403 if
        it was sent as a sender outside the key's scope."""
        await check_owner(record, key)
        return await pl.cancel(key)

    @app.post(
        "/v1/emails/{key:path}/retry",
        tags=["emails"],
        responses=_problems(401, 403, 404, 409, 422),
        openapi_extra=_json_body("RetryBody", required=False),
    )
    async def retry_email(key: str, request: Request, record: Key) -> EmailReport:
        """Send a dead-lettered (or failed) email again, optionally corrected; 409 if it
        is not dead-lettered, 403 if it was sent as a sender outside the key's scope."""
        body = await optional_body(request, RetryBody)
        await check_owner(record, key)
        await pl.retry(key, to=body.to, lane=body.lane)
        return await pl.describe(key, wait=timedelta(seconds=5))

    @app.get("/v1/emails/{key:path}", tags=["emails"], responses=_problems(401, 404))
    async def get_email(key: str, record: Key) -> EmailReport:
        """Status, lane, attempts, last SMTP reply and receipt of an email."""
        return await pl.describe(key)

    def check_operator(record: ApiKey) -> None:
        # A lane carries every sender configured on it: only an unrestricted key acts on it.
        if record.scope.restricted:
            raise Problem(
                403,
                "operator-only",
                "Operator key required",
                "name: pausing or resuming a lane needs an API key created with --senders '*'",
                field="name",
            )

    def lane_named(name: str) -> str:
        if name not in {lane.name for lane in pl.settings.lanes}:
            raise Problem(404, "not-found", "Not found", f"name: no lane is called {name!r}")
        return name

    @contextlib.contextmanager
    def lane_running() -> Iterator[None]:
        # A configured lane whose workflow no worker has started yet: 409, not a crash.
        try:
            yield
        except ConfigurationError as exc:
            raise Problem(409, "lane-not-running", "Lane not running", str(exc)) from None

    @app.get("/v1/lanes", tags=["lanes"], responses=_problems(401))
    async def lanes(record: Key) -> list[LaneReport]:
        """Every lane: rate, backpressure, caps used, backlog, and whether it is paused (and
        why: the reputation guard or an operator)."""
        return await pl.lanes.list()

    @app.post(
        "/v1/lanes/{name}/pause",
        tags=["lanes"],
        responses=_problems(401, 403, 404, 409, 422),
        openapi_extra=_json_body("LaneActionBody", required=False),
    )
    async def pause_lane(name: str, request: Request, record: Key) -> LaneReport:
        """Pause a lane by hand: its emails wait ``scheduled`` until it is resumed. Needs an
        unrestricted key (``--senders '*'``)."""
        check_operator(record)
        body = await optional_body(request, LaneActionBody)
        with lane_running():
            await pl.lanes.pause(lane_named(name), reason=body.reason or "paused over the HTTP API")
        return await pl.lanes.get(name)

    @app.post(
        "/v1/lanes/{name}/resume",
        tags=["lanes"],
        responses=_problems(401, 403, 404, 409, 422),
        openapi_extra=_json_body("LaneActionBody", required=False),
    )
    async def resume_lane(name: str, request: Request, record: Key) -> LanePause:
        """Resume a lane the reputation guard or an operator paused; answers the pause that
        ended. 409 if the lane is not paused. Needs an unrestricted key (``--senders '*'``)."""
        check_operator(record)
        body = await optional_body(request, LaneActionBody)
        with lane_running():
            return await pl.lanes.resume(lane_named(name), note=body.reason)

    @app.get("/v1/dead-letters", tags=["emails"], responses=_problems(401, 422))
    async def dead_letters(
        record: Key,
        lane: Annotated[str | None, Query(description="Only this lane's.")] = None,
        since: Annotated[
            AwareDatetime | None, Query(description="Parked at or after (ISO 8601).")
        ] = None,
    ) -> list[EmailReport]:
        """Emails parked in the dead-letter state, the longest parked first; 422 naming
        ``lane`` if no lane has that name."""
        if lane is not None and lane not in {known.name for known in pl.settings.lanes}:
            names = ", ".join(known.name for known in pl.settings.lanes)
            raise invalid("lane", f"no lane is called {lane!r} (lanes: {names})")
        return await pl.dlq.list(lane=lane, since=since)

    @app.post(
        "/v1/sequences",
        tags=["sequences"],
        status_code=202,
        responses=_problems(400, 401, 403, 409, 413, 422),
        openapi_extra=_json_body("StartSequenceRequest"),
    )
    async def start_sequence(
        request: Request, response: Response, record: Key, idempotency_key: IdemHeader = None
    ) -> Accepted:
        """Enroll one recipient in a named spec; the Idempotency-Key is the sequence's key."""
        key = require_key(idempotency_key)
        req = _parse(StartSequenceRequest, await body_of(request))
        spec = SpecDirectory(Path(api.specs_dir)).load(req.spec)
        check_sender(record, spec.sender, "spec")
        recipient = req.enrolled()
        fingerprint = hashlib.sha256(
            f"{spec.model_dump_json()}|{recipient.model_dump_json()}".encode()
        ).hexdigest()

        async def start() -> tuple[bool, BaseModel]:
            handle = await pl.sequences.start(spec, recipient, key=key)
            log.info("api.sequence_accepted", key_id=record.id, workflow_id=handle.workflow_id)
            return handle.created, Accepted(
                key=key, workflow_id=handle.workflow_id, status_url=f"/v1/sequences/{key}"
            )

        (created, body), joined = await in_flight.run(sequence_workflow_id(key), fingerprint, start)
        replayed(response, joined, created)
        response.headers["Location"] = f"/v1/sequences/{key}"
        assert isinstance(body, Accepted)
        return body

    @app.get("/v1/sequences/{key:path}", tags=["sequences"], responses=_problems(401, 404))
    async def get_sequence(key: str, record: Key) -> SequenceReport:
        """Where a sequence is: status, step, next action, what was sent, replies."""
        return await pl.sequences.status(key)

    @app.post(
        "/v1/inbound",
        tags=["inbound"],
        responses=_problems(400, 401, 413),
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "One raw RFC 5322 message, as a provider's inbound webhook "
                "delivers it.",
                "content": {"message/rfc822": {"schema": {"type": "string"}}},
            }
        },
    )
    async def inbound(request: Request, record: Key) -> InboundResult:
        """Route an inbound message (reply, bounce, auto-reply, unsubscribe) to its
        sequence, exactly as the IMAP watcher does; the same message twice changes nothing."""
        raw = await body_of(request)
        if not raw.strip():
            raise Problem(
                400,
                "malformed-body",
                "Malformed body",
                "body: empty; send the raw message",
                field="body",
            )
        key = await pl.sequences.record_reply(raw)
        log.info("api.inbound", key_id=record.id, routed=key is not None)
        return InboundResult(routed=key is not None, sequence=key)

    def token_keys() -> TokenKeys:
        nonlocal tokens
        if tokens is None:
            tokens = TokenKeys.from_settings(pl.settings)
        return tokens

    def sequence_of_token(token: str) -> str:
        opened = token_keys().open_unsubscribe_token(token)
        # Only sealed tokens: a legacy one is a readable workflow ID anyone could forge.
        if opened is None or opened[0] is None or not opened[1].startswith(SEQUENCE_ID_PREFIX):
            raise Problem(404, "not-found", "Not found", "this unsubscribe link is not valid")
        return opened[1].removeprefix(SEQUENCE_ID_PREFIX)

    @app.post(
        "/u/{token}",
        tags=["unsubscribe"],
        response_class=PlainTextResponse,
        responses=_problems(400, 404),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {"List-Unsubscribe": {"const": "One-Click"}},
                            "required": ["List-Unsubscribe"],
                        }
                    }
                },
            }
        },
    )
    async def one_click(token: str, request: Request) -> PlainTextResponse:
        """RFC 8058 one-click unsubscribe: the body must be ``List-Unsubscribe=One-Click``.
        Stops the sequence and suppresses the recipient for its sender. No redirect, no
        API key (the sealed token is the authority); repeating it changes nothing."""
        key = sequence_of_token(token)
        if not await _is_one_click(request, await body_of(request)):
            raise Problem(
                400,
                "not-one-click",
                "Not a one-click unsubscribe",
                "body: must be List-Unsubscribe=One-Click (RFC 8058)",
                field="body",
            )
        await pl.sequences.unsubscribe(key, reason="one-click unsubscribe (RFC 8058)")
        log.info("api.unsubscribed", how="one-click")
        return PlainTextResponse("You are unsubscribed.\n")

    @app.get("/u/{token}", tags=["unsubscribe"], response_class=HTMLResponse)
    async def one_click_page(token: str) -> HTMLResponse:
        """A page with one button that makes the one-click POST; a GET changes nothing
        (mail scanners follow links)."""
        sequence_of_token(token)
        return HTMLResponse(
            "<!doctype html><title>Unsubscribe</title>"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" '
            'value="One-Click"><button type="submit">Unsubscribe</button></form>'
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (
                SendEmailRequest,
                StartSequenceRequest,
                RetryBody,
                LaneActionBody,
                ProblemDetails,
            ):
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            # FastAPI's own 422 body never goes out: every error is a problem document.
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for item in schema["paths"].values():
                for op in item.values():
                    responses = op.get("responses", {})
                    if "HTTPValidationError" in str(responses.get("422", "")):
                        responses["422"] = _problems(422)[422]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _json_body(model: str, *, required: bool = True) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    }


def _too_large(size: int, limit: int) -> Problem:
    return Problem(
        413,
        "body-too-large",
        "Body too large",
        f"body: {size} bytes is more than this API's limit of {limit}",
        field="body",
    )


def _parse(model: type[M], raw: bytes) -> M:
    """Validate a JSON body, answering 400 for malformed JSON and 422 naming the fields."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            raise Problem(
                400,
                "malformed-body",
                "Malformed body",
                f"body: {errors[0]['msg']}",
                field="body",
            ) from None
        if any(e["type"] == "model_type" and not e["loc"] for e in errors):
            raise invalid("body", "must be a JSON object") from None
        found = field_errors(errors)
        for named in found:
            # By its message: `Email` reports its errors through its own exception, which
            # keeps pydantic's message and drops the error's type.
            if named.detail == _EXTRA_FORBIDDEN:
                named.detail = _unknown_field(model, named.field)
        raise from_field_errors(found) from None
    except InvalidInput as exc:  # a model whose constructor raises Postlane's own error
        raise invalid(exc.field, exc.reason) from None


def _unknown_field(model: type[BaseModel], field: str) -> str:
    """Why an unknown field is refused, naming the field it may be a misspelling of."""
    *path, name = [part for part in re.split(r"[.\[\]]", field) if part]
    where: Any = model
    for part in path:  # down to the model that holds the field
        if not part.isdigit() and isinstance(where, type) and issubclass(where, BaseModel):
            info = where.model_fields.get(part)
            where = info.annotation if info is not None else None
        while get_origin(where) in (list, Union, UnionType):  # an item's, or a value's, type
            where = next((a for a in get_args(where) if a is not type(None)), None)
    if not (isinstance(where, type) and issubclass(where, BaseModel)):
        return "is not a field of this request"
    names = list(where.model_fields)
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (fields: {', '.join(names)})"
    return "is not a field of this request" + hint


async def _is_one_click(request: Request, body: bytes) -> bool:
    """RFC 8058 3.1: the POST body carries ``List-Unsubscribe=One-Click``, as
    ``application/x-www-form-urlencoded`` or ``multipart/form-data``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        # The body was read already (bounded): parse it from what we hold.
        from starlette.datastructures import Headers
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream() -> Any:
            yield body

        try:
            form = await MultiPartParser(Headers(scope=request.scope), stream()).parse()
        except MultiPartException:  # no boundary, or parts that do not parse
            return False
        return form.get("List-Unsubscribe") == "One-Click"
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return fields.get("List-Unsubscribe") == ["One-Click"]


__all__ = ["SendEmailRequest", "StartSequenceRequest", "create_app"]
