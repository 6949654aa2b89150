"""RFC 9457 problem details: every error the API answers is ``application/problem+json``.

A problem names what went wrong in ``detail`` and, for bad input, the field in ``field``
(``to[0]``, ``headers.X-Campaign``, ``Idempotency-Key``), with every invalid field under
``errors``. ``type`` is a URN per class of problem (``urn:postlane:problem:invalid-input``),
listed in docs/api.md.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError

from postlane.errors import (
    ActionRefused,
    EmailNotFound,
    IdempotencyConflict,
    InvalidInput,
    RecipientSuppressed,
    SequenceNotFound,
)

MEDIA_TYPE = "application/problem+json"

_MAPPINGS = frozenset({"headers", "display_names"})
_KEYED_RE = re.compile(r"^([^\s:'\"]+): (.+)$", re.DOTALL)
_DOTTED_INDEX_RE = re.compile(r"\.(\d+)(?=\.|$)")
_SUBFIELD_RE = re.compile(r"^([A-Za-z_][\w.-]*(?:\[\d+\])*): (.+)$", re.DOTALL)


class FieldError(BaseModel):
    """One invalid field."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    field: str
    """Where it is in the request, e.g. ``to[0]`` or ``recipient.address``."""
    detail: str


class ProblemDetails(BaseModel):
    """An RFC 9457 problem document (the API's only error body)."""

    type: str = Field(description="URN of the problem class, e.g. urn:postlane:problem:not-found")
    title: str
    status: int
    detail: str
    instance: str | None = Field(default=None, description="The request path.")
    field: str | None = Field(default=None, description="The (first) field at fault.")
    errors: list[FieldError] | None = None


class Problem(Exception):
    """Raise to answer with a problem document.

    Args:
        status: the HTTP status.
        slug: the problem class, the last part of its ``type`` URN.
        title: short, the same for every problem of the class.
        detail: this occurrence, for people and agents alike.
        field: the request field at fault, if any.
        headers: extra response headers (``WWW-Authenticate`` for 401).
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.field = field
        self.errors = errors
        self.headers = headers

    def response(self, request: Request) -> JSONResponse:
        """The problem as a response to `request`."""
        body = ProblemDetails(
            type=f"urn:postlane:problem:{self.slug}",
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=request.url.path,
            field=self.field,
            errors=self.errors,
        )
        return JSONResponse(
            body.model_dump(exclude_none=True),
            status_code=self.status,
            media_type=MEDIA_TYPE,
            headers=self.headers,
        )


def invalid(field: str, detail: str, *, status: int = 422) -> Problem:
    """A bad field: ``field: detail``."""
    return Problem(
        status,
        "invalid-input",
        "Invalid input",
        f"{field}: {detail}",
        field=field,
        errors=[FieldError(field=field, detail=detail)],
    )


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``("to", 0)`` → ``to[0]``; ``("headers", "X-Tag")`` → ``headers.X-Tag``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def field_errors(
    errors: Any, *, strip: tuple[str, ...] = ("body", "query", "path", "header")
) -> list[FieldError]:
    """pydantic's (or FastAPI's) validation errors as `FieldError`s naming the field.

    A model-level check that says ``to[0]: why`` names its own field.
    """
    out: list[FieldError] = []
    for err in errors:
        loc = list(err.get("loc", ()))
        while loc and loc[0] in strip:
            loc.pop(0)
        field = field_path(loc)
        detail = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        sub = _SUBFIELD_RE.match(detail) if err.get("type") == "value_error" else None
        if sub is not None:
            # A check of the whole model says which field; a field's check, which part.
            field = f"{field}.{sub.group(1)}" if field else sub.group(1)
            field = _DOTTED_INDEX_RE.sub(r"[\1]", field)  # attachments.0.x: attachments[0].x
            detail = sub.group(2)
        keyed = _KEYED_RE.match(detail) if field in _MAPPINGS else None
        if keyed is not None:  # a header or an address: the mapping's key is the field
            field, detail = f"{field}.{keyed.group(1)}", keyed.group(2)
        if err.get("type") == "missing":
            detail = "is required"
        out.append(FieldError(field=field or "body", detail=detail))
    return out


def from_field_errors(errors: list[FieldError]) -> Problem:
    """A 422 naming the first field (all of them under ``errors``)."""
    first = errors[0]
    return Problem(
        422,
        "invalid-input",
        "Invalid input",
        f"{first.field}: {first.detail}",
        field=first.field,
        errors=errors,
    )


def install(app: FastAPI) -> None:
    """Answer every error of `app` (Postlane's, FastAPI's, Starlette's) as a problem."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response(request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(str(e.get("msg")) for e in errors if e.get("type") == "json_invalid")
            return Problem(
                400, "malformed-body", "Malformed body", f"body: {detail}", field="body"
            ).response(request)
        return from_field_errors(field_errors(errors)).response(request)

    async def on_postlane(request: Request, exc: Exception) -> JSONResponse:
        return problem_for(exc).response(request)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        return Problem(
            exc.status_code, slug, title, str(exc.detail), headers=dict(exc.headers or {})
        ).response(request)

    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RPCError):  # nothing was decided: the client may try again
            return Problem(
                503,
                "temporal-unavailable",
                "Temporal unavailable",
                f"Temporal did not answer ({exc.status.name}); try again",
                headers={"Retry-After": "5"},
            ).response(request)
        return Problem(
            500, "internal", "Internal error", "the server failed; see its log"
        ).response(request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    for kind in (
        InvalidInput,
        IdempotencyConflict,
        EmailNotFound,
        SequenceNotFound,
        ActionRefused,
        RecipientSuppressed,
    ):
        app.add_exception_handler(kind, on_postlane)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)


def problem_for(exc: Exception) -> Problem:
    """The problem a Postlane error means (a 500 for anything unexpected)."""
    if isinstance(exc, InvalidInput):
        field = exc.field.replace(".", "[", 1) + "]" if _is_index(exc.field) else exc.field
        return invalid(field, exc.reason)
    if isinstance(exc, IdempotencyConflict):
        return Problem(
            422,
            "idempotency-conflict",
            "Idempotency-Key reused",
            f"Idempotency-Key: {exc}",
            field="Idempotency-Key",
        )
    if isinstance(exc, EmailNotFound | SequenceNotFound):
        return Problem(404, "not-found", "Not found", str(exc))
    if isinstance(exc, ActionRefused):
        return Problem(409, "action-refused", "Action refused", str(exc))
    if isinstance(exc, RecipientSuppressed):
        return Problem(
            409, "recipient-suppressed", "Recipient suppressed", str(exc), field="recipient"
        )
    return Problem(500, "internal", "Internal error", "the server failed; see its log")


def _is_index(field: str) -> bool:
    """``to.0`` (pydantic's dotted form) should read ``to[0]``."""
    head, _, tail = field.partition(".")
    return bool(head) and tail.isdigit()
