"""Configuration: lanes (sending accounts) and inboxes (watched for replies and bounces)
from ``postlane.toml``, overridden by environment.

The file is ``$POSTLANE_CONFIG`` or ``./postlane.toml``. ``POSTLANE_*`` variables override
its top-level fields (``POSTLANE_LANES`` and ``POSTLANE_INBOXES`` take JSON lists). SMTP and
IMAP secrets are never in the file: a lane or inbox names the environment variables that
hold them, and only the worker reads them.
Temporal's own variables (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``,
``TEMPORAL_TLS_*``) are read by `postlane.connection`.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from postlane.api.settings import ApiSettings
from postlane.durations import Duration
from postlane.email.addresses import normalise_sender_pattern
from postlane.email.models import (
    RetrySettings,
)
from postlane.errors import ConfigurationError
from postlane.ids import inbox_workflow_id, lane_task_queue
from postlane.lanes.guard import GuardSettings
from postlane.lanes.models import (
    LaneLimits,
    Warmup,
)
from postlane.webhooks import WebhookConfig

DEFAULT_CONFIG_FILE = "postlane.toml"
DEV_LANE = "default"
_LANE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{1,63}$"
)
_ADDRESS_LITERAL_RE = re.compile(r"^\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]$")


class LaneConfig(BaseModel):
    """One sending account: an SMTP login with its own limits and one task queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    senders: list[str] = Field(min_length=1)
    """From addresses this lane serves; ``*@acme.test`` and ``*`` patterns are allowed."""
    smtp_host: str = Field(min_length=1)
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_tls: Literal["none", "starttls", "tls"] = "starttls"
    smtp_verify: bool = True
    """Verify the server's certificate (turn off only for a test server you trust)."""
    smtp_ca_file: str | None = None
    """PEM bundle to verify the server against, instead of the system's CAs."""
    smtp_username_env: str | None = None
    smtp_password_env: str | None = None
    smtp_timeout: float = Field(default=30.0, gt=0)
    """Seconds to wait for each SMTP reply."""
    rate_per_second: float = Field(default=5.0, gt=0)
    per_domain_per_second: float | None = Field(default=None, gt=0)
    hourly_cap: int | None = Field(default=None, gt=0)
    daily_cap: int | None = Field(default=None, gt=0)
    max_concurrent: int = Field(default=8, ge=1)
    """Sends in flight at once on one worker host."""
    warmup: Warmup | None = None
    """Ramp a new account or IP: ``{start_per_day = 50, factor = 2.0}`` doubles daily."""
    message_id_domain: str | None = None
    """Right-hand side of Message-IDs; defaults to the sender's domain."""
    ehlo_name: str | None = None
    """The name given in EHLO. Default: this host's FQDN if it is a real one (has a dot,
    is not ``localhost``), else the domain of the lane's first sender (``*@acme.test`` →
    ``acme.test``), else the connection's address literal (``[192.0.2.1]``)."""
    retry: RetrySettings = RetrySettings()
    failover: str | None = None
    """Another lane that takes this lane's sends while its provider is down (docs/routing.md)."""
    failover_after: int = Field(default=3, ge=1)
    """Refused or timed-out connections in a row (per worker) that open the circuit."""
    circuit_probe_seconds: float = Field(default=30.0, gt=0)
    """Seconds an open circuit waits before probing the provider again (half-open)."""
    domain_deferrals: int = Field(default=3, ge=1)
    """Consecutive 4xx replies from one recipient domain that put it in backoff (a 421 or
    4.7.x reply does at once)."""
    guard: GuardSettings = GuardSettings()
    """``[lanes.guard]``: the bounce, complaint and deferral rates that pause the lane
    (docs/reputation.md)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _LANE_NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lower-case letters, digits, '-' and '_'")
        return v

    @field_validator("ehlo_name")
    @classmethod
    def _ehlo_name(cls, v: str | None) -> str | None:
        if v is not None and not (_HOSTNAME_RE.match(v) or _ADDRESS_LITERAL_RE.match(v)):
            raise ValueError(
                f"{v!r}: use a fully qualified host name (mail.acme.test) or an address"
                " literal ([192.0.2.1])"
            )
        return v

    @field_validator("senders")
    @classmethod
    def _senders(cls, v: list[str]) -> list[str]:
        # Senders arrive with internationalised domains in A-labels: so must the patterns.
        return [normalise_sender_pattern(pattern) for pattern in v]

    @model_validator(mode="after")
    def _consistent(self) -> LaneConfig:
        if bool(self.smtp_username_env) != bool(self.smtp_password_env):
            raise ValueError("smtp_username_env and smtp_password_env must be set together")
        if self.hourly_cap is not None and self.hourly_cap < self.rate_per_second:
            raise ValueError(
                f"hourly_cap: {self.hourly_cap} is less than one second at rate_per_second"
                f" {self.rate_per_second:g}"
            )
        if self.daily_cap is not None and self.hourly_cap is not None:
            if self.daily_cap < self.hourly_cap:
                raise ValueError(
                    f"daily_cap: {self.daily_cap} is less than hourly_cap {self.hourly_cap}"
                )
        return self

    @property
    def has_quota(self) -> bool:
        """Sends must ask the lane's quota workflow for a slot (caps or warm-up)."""
        return self.hourly_cap is not None or self.daily_cap is not None or self.warmup is not None

    def limits(self) -> LaneLimits:
        """What the lane's quota workflow enforces."""
        return LaneLimits(
            rate_per_second=self.rate_per_second,
            per_domain_per_second=self.per_domain_per_second,
            hourly_cap=self.hourly_cap,
            daily_cap=self.daily_cap,
            warmup=self.warmup,
            failover=self.failover,
            circuit_probe_after=timedelta(seconds=self.circuit_probe_seconds),
            guard=self.guard,
        )

    @property
    def task_queue(self) -> str:
        """The lane's activity task queue."""
        return lane_task_queue(self.name)

    def credentials(self) -> tuple[str, str] | None:
        """Read the SMTP login from the environment (worker side only).

        Raises:
            ConfigurationError: a named variable is not set.
        """
        if not self.smtp_username_env or not self.smtp_password_env:
            return None
        values = []
        for var in (self.smtp_username_env, self.smtp_password_env):
            value = os.environ.get(var)
            if not value:
                raise ConfigurationError(
                    f"lane {self.name!r}: environment variable {var} is not set"
                )
            values.append(value)
        return values[0], values[1]

    def serves(self, sender: str) -> int:
        """How specifically this lane serves `sender`: 3 exact, 2 domain, 1 catch-all, 0 not."""
        sender = sender.lower()
        best = 0
        for pattern in (p.lower() for p in self.senders):
            if pattern == sender:
                return 3
            if pattern == "*":
                best = max(best, 1)
            elif fnmatch.fnmatchcase(sender, pattern):
                best = max(best, 2)
        return best


class InboxConfig(BaseModel):
    """One mailbox watched over IMAP for replies, bounces and unsubscribes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Names the inbox's watcher workflow, ``inbound:<name>``."""
    imap_host: str = Field(min_length=1)
    imap_port: int | None = Field(default=None, ge=1, le=65535)
    """Default 993 with ``imap_tls = "tls"``, else 143."""
    imap_tls: Literal["none", "starttls", "tls"] = "tls"
    imap_verify: bool = True
    """Verify the server's certificate (turn off only for a test server you trust)."""
    imap_ca_file: str | None = None
    """PEM bundle to verify the server against, instead of the system's CAs."""
    imap_timeout: float = Field(default=30.0, gt=0)
    """Seconds to wait for each IMAP response."""
    username_env: str = Field(min_length=1)
    """Environment variable holding the IMAP login (the value never enters the file)."""
    password_env: str = Field(min_length=1)
    folder: str = Field(default="INBOX", min_length=1)
    poll_interval: Duration = Field(default=timedelta(seconds=60))
    """How long the watcher waits between polls: ``"30s"``, ``"5m"``, or seconds."""
    max_messages: int = Field(default=50, ge=1, le=500)
    """Messages fetched per poll at most; a longer backlog is read in several polls."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _LANE_NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lower-case letters, digits, '-' and '_'")
        return v

    @field_validator("poll_interval")
    @classmethod
    def _interval(cls, v: timedelta) -> timedelta:
        if v < timedelta(seconds=1):
            raise ValueError("must be at least 1 second")
        return v

    @field_validator("folder")
    @classmethod
    def _folder(cls, v: str) -> str:
        if any(c in v for c in '\r\n\x00"'):
            raise ValueError(f"{v!r}: no quotes or control characters")
        return v

    @property
    def port(self) -> int:
        """The IMAP port, defaulted by the TLS mode."""
        if self.imap_port is not None:
            return self.imap_port
        return 993 if self.imap_tls == "tls" else 143

    @property
    def workflow_id(self) -> str:
        """The inbox's watcher workflow."""
        return inbox_workflow_id(self.name)

    def credentials(self) -> tuple[str, str]:
        """Read the IMAP login from the environment (worker side only).

        Raises:
            ConfigurationError: a named variable is not set.
        """
        values = []
        for var in (self.username_env, self.password_env):
            value = os.environ.get(var)
            if not value:
                raise ConfigurationError(
                    f"inbox {self.name!r}: environment variable {var} is not set"
                )
            values.append(value)
        return values[0], values[1]


class RouteConfig(BaseModel):
    """One ``[[routes]]`` rule: emails matching every condition given go by `lane`.

    Rules are tried in file order and the first match wins; an email no rule matches goes
    by its sender's lane. An explicit lane (``retry --lane``, a raw ``lane`` in the input)
    is never rerouted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lane: str
    name: str = ""
    """Shown in the email's status; default ``routes[<index>]``."""
    sender: str | None = None
    """Sender address or pattern (``*@news.acme.test``)."""
    recipient_domain: list[str] = Field(default_factory=list)
    """Matches when any recipient's domain matches one of these (``gmail.com``, ``*.edu``)."""
    tag: str | None = None
    """Matches when the email carries this tag."""
    priority: Literal["high", "normal", "bulk"] | None = None

    def matches(self, sender: str, domains: list[str], tags: list[str], priority: str) -> bool:
        """Does an email with these properties match every condition of this rule?"""
        if self.sender is not None and not fnmatch.fnmatchcase(sender.lower(), self.sender.lower()):
            return False
        if self.recipient_domain and not any(
            fnmatch.fnmatchcase(d.lower(), p.lower())
            for d in domains
            for p in self.recipient_domain
        ):
            return False
        if self.tag is not None and self.tag not in tags:
            return False
        return self.priority is None or self.priority == priority


def dev_lane(smtp_port: int = 1025) -> LaneConfig:
    """The embedded default: every sender, to the local SMTP catcher."""
    return LaneConfig(
        name=DEV_LANE,
        senders=["*"],
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_tls="none",
        rate_per_second=50,
        retry=RetrySettings(
            initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
        ),
    )


class Settings(BaseSettings):
    """Postlane's configuration. Build it with `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="POSTLANE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    lanes: list[LaneConfig] = Field(default_factory=lambda: [dev_lane()])
    routes: list[RouteConfig] = Field(default_factory=list)
    """``[[routes]]``: rules that choose an email's lane (docs/routing.md)."""
    inboxes: list[InboxConfig] = Field(default_factory=list)
    """Mailboxes watched for replies, bounces and unsubscribes (``postlane inbound``)."""
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    """Event subscriptions (``[[webhooks]]``; docs/webhooks.md)."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Workers serve Prometheus metrics on this port (``POSTLANE_METRICS_PORT``); 0: off."""
    metrics_address: str = "0.0.0.0"
    """Address the metrics and health endpoints bind to (``POSTLANE_METRICS_ADDRESS``)."""
    health_port: int = Field(default=0, ge=0, le=65535)
    """Workers serve ``/healthz`` and ``/readyz`` on this port (``POSTLANE_HEALTH_PORT``);
    0: off."""
    recipient_domain_attribute: bool = True
    """Index each email's recipient domains as ``PostlaneRecipientDomain``
    (``POSTLANE_RECIPIENT_DOMAIN_ATTRIBUTE``). Search attributes are never encrypted; false
    keeps the domains out of them (set it on the workers and the sending clients alike)."""
    token_secret: SecretStr | None = None
    """Key material for Message-IDs and unsubscribe tokens (``POSTLANE_TOKEN_SECRET``; at
    least 32 characters, the same on every worker). Never put it in the file."""
    token_secret_file: str | None = None
    """A file holding the token secret instead (``POSTLANE_TOKEN_SECRET_FILE``)."""
    accept_legacy_tokens: bool = True
    """Route replies and unsubscribes that carry the unauthenticated Message-IDs and tokens
    of mail sent before sealing (``POSTLANE_ACCEPT_LEGACY_TOKENS=false`` turns it off)."""
    api: ApiSettings = Field(default_factory=ApiSettings)
    """The HTTP API (``[api]``; ``postlane api``, docs/api.md)."""

    @field_validator("lanes")
    @classmethod
    def _unique(cls, v: list[LaneConfig]) -> list[LaneConfig]:
        if not v:
            raise ValueError("at least one lane is required")
        names = [lane.name for lane in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"lane names must be unique; repeated: {', '.join(dupes)}")
        return v

    @field_validator("inboxes")
    @classmethod
    def _unique_inboxes(cls, v: list[InboxConfig]) -> list[InboxConfig]:
        names = [inbox.name for inbox in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"inbox names must be unique; repeated: {', '.join(dupes)}")
        return v

    @field_validator("webhooks")
    @classmethod
    def _unique_webhooks(cls, v: list[WebhookConfig]) -> list[WebhookConfig]:
        names = [hook.name for hook in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"webhook names must be unique; repeated: {', '.join(dupes)}")
        return v

    def webhook_events(self) -> list[str]:
        """Every event some subscription wants, sorted."""
        return sorted({str(event) for hook in self.webhooks for event in hook.events})

    @model_validator(mode="after")
    def _known_lanes(self) -> Settings:
        names = [lane.name for lane in self.lanes]
        wrong: list[tuple[tuple[str | int, ...], str]] = []
        for i, lane in enumerate(self.lanes):
            if lane.failover is not None and (
                lane.failover not in names or lane.failover == lane.name
            ):
                wrong.append((("lanes", i, "failover"), lane.failover))
        wrong += [(("routes", i, "lane"), r.lane) for i, r in enumerate(self.routes)]
        for loc, value in wrong:
            if value in names and loc[0] == "routes":
                continue
            raise ValidationError.from_exception_data(
                "Settings",
                [
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "unknown_lane",
                            "'{value}' is not another configured lane (lanes: {known})",
                            {"value": value, "known": ", ".join(names)},
                        ),
                        loc=loc,
                        input=value,
                    )
                ],
            )
        return self

    def route_for(
        self, sender: str, domains: list[str], tags: list[str], priority: str
    ) -> tuple[LaneConfig, str] | None:
        """The lane the first matching ``[[routes]]`` rule names, and the rule's name."""
        for i, route in enumerate(self.routes):
            if route.matches(sender, domains, tags, priority):
                return self.lane(route.lane), route.name or f"routes[{i}]"
        return None

    def inbox(self, name: str) -> InboxConfig:
        """The inbox called `name`.

        Raises:
            ConfigurationError: there is none.
        """
        return _named(self.inboxes, name, "inbox")

    def lane(self, name: str) -> LaneConfig:
        """The lane called `name`.

        Raises:
            ConfigurationError: there is none.
        """
        return _named(self.lanes, name, "lane")

    def lane_for(self, sender: str) -> LaneConfig | None:
        """The lane that serves `sender` most specifically, or None."""
        ranked = sorted(self.lanes, key=lambda lane: lane.serves(sender), reverse=True)
        return ranked[0] if ranked and ranked[0].serves(sender) else None


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_T = TypeVar("_T", bound=_Named)


def _named(items: list[_T], name: str, what: str) -> _T:
    for item in items:
        if item.name == name:
            return item
    raise ConfigurationError(f"no {what} named {name!r}")


def _from_file(file: Path) -> type[Settings]:
    """`Settings` read from `file` by pydantic-settings' TOML source, where the environment
    overrides the file (plain `Settings(...)` built in code keeps exactly what it is given)."""

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return env_settings, TomlConfigSettingsSource(settings_cls, toml_file=file)

    return FileSettings


def config_path() -> Path:
    """The configuration file Postlane reads."""
    return Path(os.environ.get("POSTLANE_CONFIG", DEFAULT_CONFIG_FILE))


def load_settings(path: str | Path | None = None) -> Settings:
    """Load and validate the configuration.

    Args:
        path: the TOML file; default ``$POSTLANE_CONFIG`` or ``./postlane.toml``. A missing
            default file means the embedded dev lane; a missing explicit file is an error.

    Raises:
        ConfigurationError: the file is unreadable or invalid; the message names the file,
            the line and the field.
    """
    explicit = path is not None or "POSTLANE_CONFIG" in os.environ
    file = Path(path) if path is not None else config_path()
    if explicit and not file.exists():
        raise ConfigurationError(f"{file}: configuration file not found")
    try:
        merged = _from_file(file)()
        return Settings(**dict(merged))  # every field, already merged and validated
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"at line (\d+)", str(exc))
        where = f"{file}:{at.group(1)}" if at else str(file)
        raise ConfigurationError(f"{where}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"{file}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        row = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigurationError(f"{file}:{row}: invalid TOML: not UTF-8 text") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        text = file.read_text(encoding="utf-8", errors="replace") if file.exists() else ""
        line = _line_of(text, err["loc"]) if text else None
        where = f"{file}:{line}" if line else str(file)
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigurationError(f"{where}: {'.'.join(loc) or 'config'}: {msg}") from None


def _line_of(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Best-effort line number of the field at `loc` (e.g. ``('lanes', 1, 'smtp_port')``)."""
    lines = text.splitlines()
    if len(loc) >= 2 and isinstance(loc[1], int):
        table, index = str(loc[0]), loc[1]
        header = re.compile(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]")
        starts = [i for i, line in enumerate(lines) if header.match(line)]
        if index >= len(starts):
            return None
        start = starts[index]
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
            len(lines),
        )
        if len(loc) >= 4:
            # A field of the element's sub-table (``[lanes.guard]``), before the next element.
            sub = re.compile(rf"^\s*\[\s*{re.escape(table)}\.{re.escape(str(loc[2]))}\s*\]")
            key = re.compile(rf"^\s*{re.escape(str(loc[3]))}\s*=")
            after = next((s for s in starts if s > start), len(lines))
            opened = next((i for i in range(start + 1, after) if sub.match(lines[i])), None)
            if opened is not None:
                for i in range(opened + 1, after):
                    if lines[i].lstrip().startswith("["):
                        break
                    if key.match(lines[i]):
                        return i + 1
                return opened + 1
        if len(loc) >= 3:
            key = re.compile(rf"^\s*{re.escape(str(loc[2]))}\s*=")
            for i in range(start + 1, end):
                if key.match(lines[i]):
                    return i + 1
        return start + 1
    if len(loc) >= 2 and isinstance(loc[1], str):  # a key of a plain table, e.g. [api]
        header = re.compile(rf"^\s*\[\s*{re.escape(str(loc[0]))}\s*\]")
        key = re.compile(rf"^\s*{re.escape(str(loc[1]))}\s*=")
        at = next((i for i, line in enumerate(lines) if header.match(line)), None)
        if at is not None:
            for i in range(at + 1, len(lines)):
                if lines[i].lstrip().startswith("["):
                    break
                if key.match(lines[i]):
                    return i + 1
            return at + 1
    if loc:
        key = re.compile(rf"^\s*{re.escape(str(loc[0]))}\s*=")
        for i, line in enumerate(lines):
            if key.match(line):
                return i + 1
    return None
