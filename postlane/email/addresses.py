"""Email addresses as people write them: ``ada@acme.test``, ``Ada Lovelace <ada@acme.test>``,
``"Lovelace, Ada" <ada@acme.test>``, ``bob@bücher.example``, ``zoë@example.test``.

`parse_mailbox` splits the optional display name from the address and normalises the
address to the form SMTP and RFC 5322 carry: an internationalised domain becomes its
A-labels (IDNA, ``xn--...``), so everything downstream (lane lookup, Message-ID, the
envelope, the headers) sees an ASCII domain. A non-ASCII local part stays UTF-8; sending to
or from it needs a server that offers SMTPUTF8 (RFC 6531).

Only the standard library is imported: workflow code validates these through the models.
"""

from __future__ import annotations

import encodings.idna
import re
from dataclasses import dataclass

MAX_ADDRESS_LENGTH = 254
"""Octets of a whole address (RFC 5321's path limit, minus the angle brackets)."""
MAX_LOCAL_LENGTH = 64
"""Octets of a local part (RFC 5321, section 4.5.3.1.1)."""
MAX_DISPLAY_NAME_LENGTH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
# Quoted local parts and address literals are legal, but so rare in outbound mail that
# accepting them mostly lets typos through.
_ASCII_LOCAL_RE = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
# RFC 6532: a local part may also hold any non-ASCII character (UTF8-non-ascii).
_UTF8_LOCAL_RE = re.compile(rf"^[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNQUOTED_NAME_FORBIDDEN = set('"<>,;@\\')


@dataclass(frozen=True)
class Mailbox:
    """One parsed mailbox: a normalised address and an optional display name."""

    address: str
    """``local@domain``; the domain is ASCII (A-labels for an internationalised one)."""
    name: str | None = None
    """The display name, unquoted and unescaped (None if none was given)."""

    @property
    def local(self) -> str:
        """The part before the ``@``."""
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        """The ASCII domain."""
        return self.address.rpartition("@")[2]

    @property
    def needs_smtputf8(self) -> bool:
        """The local part is not ASCII: only a server offering SMTPUTF8 can take it."""
        return not self.address.isascii()


def parse_mailbox(value: str) -> Mailbox:
    """Parse ``address``, ``Name <address>`` or ``"Name" <address>``.

    Raises:
        ValueError: `value` is not a valid mailbox; the message quotes it and says why.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a valid email address: expected a string")
    text = value.strip()
    if _CONTROL_RE.search(text):
        raise _invalid(value, "it contains a control character (CR, LF, tab, NUL, ...)")
    if text.endswith(">"):
        start = text.rfind("<")
        if start < 0:
            raise _invalid(value, "'>' without '<'")
        name = _display_name(value, text[:start].strip())
        return Mailbox(normalise_address(text[start + 1 : -1].strip(), original=value), name)
    if "<" in text or ">" in text:
        raise _invalid(value, "write a display name as 'Name <address>'")
    return Mailbox(normalise_address(text, original=value))


def normalise_address(value: str, *, original: str | None = None) -> str:
    """A bare ``local@domain`` with its domain in ASCII (A-labels); ASCII domains are kept
    exactly as given, so an address that was already valid does not change.

    Raises:
        ValueError: it is not a valid address.
    """
    shown = value if original is None else original
    local, at, domain = value.rpartition("@")
    if not at or not local:
        raise _invalid(shown, "it needs a local part, '@' and a domain")
    if not domain:
        raise _invalid(shown, "no domain after '@'")
    if not (_ASCII_LOCAL_RE.match(local) or _UTF8_LOCAL_RE.match(local)):
        raise _invalid(shown, f"{local!r} is not a valid local part")
    if len(local.encode()) > MAX_LOCAL_LENGTH:
        raise _invalid(shown, f"the local part is over {MAX_LOCAL_LENGTH} octets")
    ascii_domain = domain if domain.isascii() else _idna(shown, domain)
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL_RE.match(label) for label in labels):
        raise _invalid(shown, f"{domain!r} is not a valid domain")
    address = f"{local}@{ascii_domain}"
    if len(address.encode()) > MAX_ADDRESS_LENGTH:
        raise _invalid(shown, f"it is over {MAX_ADDRESS_LENGTH} octets")
    return address


def normalise_sender_pattern(pattern: str) -> str:
    """A lane's sender pattern (``*``, ``*@domain``, ``*@*.domain`` or an address) with any
    internationalised domain label in A-labels, as senders are (`normalise_address`).

    Raises:
        ValueError: an address pattern is not a valid address, or a label is not valid IDNA.
    """
    if pattern == "*":
        return pattern
    if not pattern.startswith("*@"):
        return normalise_address(pattern)
    domain = pattern[2:]
    if domain.isascii():
        return pattern
    labels = [
        label if label.isascii() else _idna(pattern, label)
        for label in encodings.idna.dots.split(domain)
    ]
    return "*@" + ".".join(labels)


def _idna(shown: str, domain: str) -> str:
    """The A-label form of an internationalised domain (IDNA, RFC 3490 mapping)."""
    labels = encodings.idna.dots.split(domain)
    try:
        return ".".join(encodings.idna.ToASCII(label).decode("ascii") for label in labels)
    except UnicodeError as exc:
        raise _invalid(
            shown, f"{domain!r} is not a valid internationalised domain ({exc})"
        ) from None


def _display_name(shown: str, raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise _invalid(shown, "the display name's quotes are not closed")
        name, escaped = [], False
        for char in raw[1:-1]:
            if escaped:
                name.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                raise _invalid(shown, "a '\"' inside a quoted display name must be escaped")
            else:
                name.append(char)
        if escaped:
            raise _invalid(shown, "the display name ends with a lone '\\'")
        result = "".join(name)
    else:
        bad = sorted(_UNQUOTED_NAME_FORBIDDEN & set(raw))
        if bad:
            raise _invalid(
                shown, f"quote a display name that contains {' '.join(bad)}: '\"Name\" <address>'"
            )
        result = raw
    result = " ".join(result.split())
    if len(result) > MAX_DISPLAY_NAME_LENGTH:
        raise _invalid(shown, f"the display name is over {MAX_DISPLAY_NAME_LENGTH} characters")
    return result or None


def _invalid(value: str, why: str) -> ValueError:
    return ValueError(f"{value!r} is not a valid email address: {why}")
