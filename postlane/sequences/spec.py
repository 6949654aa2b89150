"""What a sequence is: its steps, templates, sending hours and recipients.

A `SequenceSpec` is written by hand (``spec.toml``) or built in Python. It is validated
whole before anything starts: step IDs, branch targets (forward only, so every sequence
ends), template names, time zones and sending hours.
"""

from __future__ import annotations

import re
import tomllib
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from postlane.durations import Duration
from postlane.email.models import Priority, check_address, invalid_email_from
from postlane.errors import InvalidSpec
from postlane.names import Activity

STOP = "stop"
"""Branch target that ends the sequence."""
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_STEP_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_CLOCK_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_VARIABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_timezone(value: str) -> str:
    """Return the IANA time zone name if this machine knows it.

    Raises:
        ValueError: it is not a known zone such as ``Europe/Paris``.
    """
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone like 'Europe/Paris'") from None
    return value


def parse_clock(value: str) -> time:
    """``"09:30"`` → 09:30.

    Raises:
        ValueError: not ``HH:MM`` on a 24-hour clock.
    """
    match = _CLOCK_RE.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a time like '09:30'")
    return time(int(match.group(1)), int(match.group(2)))


STRICT_FIELDS = {"strict_fields": True}
"""Validation context of user-written specs (`spec_from_dict`): unknown fields are refused."""


class _SpecPart(BaseModel):
    """A part of a spec: strict about unknown fields where a person wrote it, lenient on
    the wire.

    A spec travels inside `SequenceInput`, so a newer client's extra field must not break
    an older worker (fields are ignored by default). A spec file with a misspelt field,
    though, would silently lose it, so `spec_from_dict` validates with `STRICT_FIELDS`
    and each unknown field is refused by name.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(info.context, dict):
            if info.context.get("strict_fields"):
                known = set(cls.model_fields)
                for name in data:
                    if name not in known:
                        raise ValueError(f"{name}: unknown field (misspelt?)")
        return data


class Template(_SpecPart):
    """A Jinja2 email template, rendered per recipient (sandboxed, strict undefined)."""

    subject: str = Field(min_length=1)
    text: str | None = None
    html: str | None = None

    @model_validator(mode="after")
    def _body(self) -> Template:
        if not self.text and not self.html:
            raise ValueError("text: a template needs a text or html body")
        return self


class _Step(_SpecPart):
    id: str
    """Unique within the spec; also the last part of the step's email key."""
    next: str | None = None
    """The step to go to afterwards (default: the following one; ``stop`` ends)."""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _STEP_ID_RE.match(v):
            raise ValueError(f"{v!r}: use 1-40 lower-case letters, digits, '-' and '_'")
        return v


class SendStep(_Step):
    """Send one email: a named template, or a literal subject and body (not rendered)."""

    type: Literal["send"] = "send"
    template: str | None = None
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    thread: bool = True
    """Reply in the thread of the earlier messages (In-Reply-To, References)."""

    @model_validator(mode="after")
    def _content(self) -> SendStep:
        literal = self.subject is not None or self.text is not None or self.html is not None
        if self.template and literal:
            raise ValueError("template: give a template or a literal subject/text, not both")
        if not self.template and not (self.subject and (self.text or self.html)):
            raise ValueError("template: a send step needs a template or a subject and text")
        return self


class WaitStep(_Step):
    """Wait a duration, or until a local time of day in the recipient's time zone."""

    type: Literal["wait"] = "wait"
    duration: Duration | None = None
    until: str | None = None
    """``"09:00"``: the next 09:00 in the recipient's zone (on `days`, if given)."""
    days: list[Weekday] | None = None
    within_sending_hours: bool = False
    """After waiting, also wait for the spec's sending hours to open."""

    @field_validator("until")
    @classmethod
    def _until(cls, v: str | None) -> str | None:
        if v is not None:
            parse_clock(v)
        return v

    @model_validator(mode="after")
    def _one(self) -> WaitStep:
        if (self.duration is None) == (self.until is None):
            raise ValueError("duration: give exactly one of duration and until")
        if self.duration is not None and self.duration <= timedelta(0):
            raise ValueError("duration: must be positive")
        if self.days is not None and self.until is None:
            raise ValueError("days: only applies with until")
        return self


class WaitForReplyStep(_Step):
    """Wait for the person to reply, at most `timeout`; branch on what happened."""

    type: Literal["wait_for_reply"] = "wait_for_reply"
    timeout: Duration
    on_reply: str = STOP
    """Step to go to when they reply (default: stop)."""
    on_timeout: str | None = None
    """Step to go to when they do not (default: the following one)."""

    @field_validator("timeout")
    @classmethod
    def _positive(cls, v: timedelta) -> timedelta:
        if v <= timedelta(0):
            raise ValueError("must be positive")
        return v


class ComposeStep(_Step):
    """Ask an agent (a user-supplied activity) for a draft, optionally approve it, send it."""

    type: Literal["compose"] = "compose"
    instructions: str = ""
    """Jinja2 template rendered per recipient and handed to the agent."""
    activity: str = Activity.COMPOSE_EMAIL
    """Name of the agent activity (``postlane worker --agent module:function``)."""
    task_queue: str | None = None
    """Queue of the worker that hosts the agent; default Postlane's own (``postlane``)."""
    timeout: Duration = timedelta(minutes=2)
    max_attempts: int = Field(default=3, ge=1)
    """Drafts that fail validation are asked for again, this many times in all."""
    approval: bool = False
    """Hold the draft until an ``approve`` signal (a person checks it)."""
    approval_timeout: Duration | None = None
    """Stop the sequence when nobody decides within this long (default: wait forever)."""
    thread: bool = True


class StopStep(_Step):
    """End the sequence here."""

    type: Literal["stop"] = "stop"


AnyStep = Annotated[
    SendStep | WaitStep | WaitForReplyStep | ComposeStep | StopStep,
    Field(discriminator="type"),
]


class SequenceSpec(_SpecPart):
    """A multi-step sequence, the same for every recipient enrolled in it."""

    name: str
    """Campaign name; bulk enrollment keys each recipient ``<name>:<address>``."""
    sender: str
    """From address; picks the lane, like `Email.sender`."""
    steps: list[AnyStep] = Field(min_length=1, max_length=100)
    templates: dict[str, Template] = Field(default_factory=dict)
    timezone: str = "UTC"
    """Zone of recipients that do not name their own."""
    sending_hours: str | None = None
    """``"09:00-17:00"``: sends wait for this window in the recipient's zone."""
    sending_days: list[Weekday] | None = None
    """Days sends may go out on (default every day)."""
    unsubscribe_url: str | None = None
    """One-click (RFC 8058) unsubscribe URL, a Jinja2 template; ``{{ unsubscribe_token }}``
    identifies the enrollment. A ``mailto:`` unsubscribe to the sender is always offered."""
    priority: Priority = Priority.NORMAL
    reply_to: str | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", v):
            raise ValueError(f"{v!r}: use 1-64 letters, digits, '.', '-' and '_'")
        return v

    @field_validator("sender", "reply_to")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return None if v is None else check_address(v)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        return check_timezone(v)

    @field_validator("sending_hours")
    @classmethod
    def _hours(cls, v: str | None) -> str | None:
        if v is not None:
            start, _, end = v.partition("-")
            if parse_clock(start.strip()) >= parse_clock(end.strip() or "x"):
                raise ValueError(f"{v!r}: the window must end after it starts, e.g. 09:00-17:00")
        return v

    @model_validator(mode="after")
    def _graph(self) -> SequenceSpec:
        index: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            if step.id in index or step.id == STOP:
                raise ValueError(f"steps.{i}.id: {step.id!r} is used twice or reserved")
            index[step.id] = i
        for i, step in enumerate(self.steps):
            targets = {"next": step.next}
            if isinstance(step, WaitForReplyStep):
                targets.update(on_reply=step.on_reply, on_timeout=step.on_timeout)
            for field, target in targets.items():
                if target is None or target == STOP:
                    continue
                if target not in index:
                    raise ValueError(f"steps.{i}.{field}: no step {target!r}")
                if index[target] <= i:
                    raise ValueError(
                        f"steps.{i}.{field}: {target!r} is not after this step; "
                        "branches go forward so every sequence ends"
                    )
            if isinstance(step, SendStep) and step.template not in (None, *self.templates):
                raise ValueError(f"steps.{i}.template: no template {step.template!r}")
        return self

    @property
    def window(self) -> tuple[time, time] | None:
        """The sending hours as (opens, closes), or None for any time."""
        if self.sending_hours is None:
            return None
        start, _, end = self.sending_hours.partition("-")
        return parse_clock(start.strip()), parse_clock(end.strip())

    def index(self, step_id: str) -> int:
        """Position of a step."""
        return next(i for i, s in enumerate(self.steps) if s.id == step_id)


class Recipient(_SpecPart):
    """One person enrolled in a sequence, with the variables its templates use."""

    address: str
    name: str | None = None
    timezone: str | None = None
    """IANA zone for `until` waits and sending hours (default: the spec's)."""
    variables: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_address(v)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        return None if v is None else check_timezone(v)

    @field_validator("variables")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _VARIABLE_RE.match(name):
                raise ValueError(f"{name!r} is not a variable name (letters, digits, '_')")
        return v


def spec_from_dict(data: dict[str, Any]) -> SequenceSpec:
    """Validate a spec given as plain data.

    Raises:
        InvalidSpec: naming the first bad field, e.g. ``steps.2.timeout``.
    """
    try:
        return SequenceSpec.model_validate(data, context=STRICT_FIELDS)
    except ValidationError as exc:
        err = invalid_email_from(exc)
        raise InvalidSpec(err.field, err.reason) from None


def load_spec(path: str | Path) -> SequenceSpec:
    """Read and validate ``spec.toml``.

    Raises:
        InvalidSpec: the file is unreadable, not TOML, or a field is invalid; the message
            names the file and the field.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidSpec(str(path), exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidSpec(str(path), f"not TOML: {exc}") from None
    try:
        return spec_from_dict(data)
    except InvalidSpec as exc:
        raise InvalidSpec(f"{path}: {exc.field}", exc.reason) from None
