"""Durations as people type them: ``45s``, ``30m``, ``1h30m``, ``3d``, ``1w``.

The one parser for every place a duration is written: sequence specs, ``postlane.toml``
and CLI options. Pure (no I/O, no clock), so workflow code may import it.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator

_SHORT_FORM = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNIT_SECONDS = (7 * 86400, 86400, 3600, 60, 1)


def parse_duration(text: str) -> timedelta:
    """``"45s"``, ``"30m"``, ``"1h30m"``, ``"3d"``, ``"1w2d"`` → timedelta.

    Units are w, d, h, m, s, largest first, each at most once, with no spaces.

    Raises:
        ValueError: anything else.
    """
    match = _SHORT_FORM.fullmatch(text.strip())
    if match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration like 45s, 30m, 1h30m, 3d or 1w")
    seconds = sum(int(n) * size for n, size in zip(match.groups(), _UNIT_SECONDS, strict=True) if n)
    return timedelta(seconds=seconds)


def _short_form_or_unchanged(value: Any) -> Any:
    # Other forms (ISO 8601 "PT1H", a number of seconds) are left to pydantic's own parser.
    if isinstance(value, str) and _SHORT_FORM.fullmatch(value.strip()) and value.strip():
        return parse_duration(value)
    return value


Duration = Annotated[timedelta, BeforeValidator(_short_form_or_unchanged)]
"""A timedelta field that also accepts the short form (``3d``, ``12h``, ``1h30m``)."""


def format_duration(delta: timedelta) -> str:
    """The largest whole unit of `delta`, e.g. ``3d``, ``5h``, ``12m``, ``40s`` (never negative)."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
