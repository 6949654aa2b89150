"""A strict checker of messages as they arrive over SMTP: the raw bytes, not a parse of them.

`check_message` reads the bytes a server received with its own small parser (Python's email
package is lenient and decodes, which hides exactly the faults that matter) and lists what
breaks RFC 5322 (syntax, line length, Date, Message-ID), RFC 2047 (encoded-words only
where allowed), RFC 2369 / 8058 (List-* headers), RFC 2045/2046 (MIME structure and
transfer encodings) and RFC 6531/6532/6152 (8-bit data only when the envelope said so).

The test environment's `SmtpCatcher` runs it on every message it accepts.
"""

from __future__ import annotations

import binascii
import codecs
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

MAX_LINE = 998
RECOMMENDED_LINE = 78

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_ATEXT_UTF8 = _ATEXT + "\u0080-\U0010ffff"
_DOT_ATOM = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_DOT_ATOM_UTF8 = rf"[{_ATEXT_UTF8}]+(?:\.[{_ATEXT_UTF8}]+)*"
_FIELD_NAME_RE = re.compile(rb"^([\x21-\x39\x3b-\x7e]+):")
_MSG_ID_RE = re.compile(rf"^<{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[\x21-\x5a\x5e-\x7e]*\])>$")
_MSG_ID_RE_UTF8 = re.compile(
    rf"^<{_DOT_ATOM_UTF8}@(?:{_DOT_ATOM_UTF8}|\[[\x21-\x5a\x5e-\x7e]*\])>$"
)
_ADDR_SPEC_RE = re.compile(rf"^{_DOT_ATOM}@{_DOT_ATOM}$")
_ADDR_SPEC_RE_UTF8 = re.compile(rf"^{_DOT_ATOM_UTF8}@{_DOT_ATOM}$")
_ENCODED_WORD_RE = re.compile(r"=\?([^?*\s]+)(?:\*[^?\s]+)?\?([BbQq])\?([^?\s]*)\?=")
_ENCODED_WORD_ANYWHERE = re.compile(r"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=")
_Q_PHRASE_RE = re.compile(r"^[A-Za-z0-9!*+/=_-]*$")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x3b\x3d\x3f-\x7e]+$")
_DATE_RE = re.compile(
    r"^(?:(Mon|Tue|Wed|Thu|Fri|Sat|Sun), ?)?(\d{1,2}) "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) (\d{4}) "
    r"(\d{2}):(\d{2})(?::(\d{2}))? ([+-])(\d{2})(\d{2})$"
)
_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_DAYS = "Mon Tue Wed Thu Fri Sat Sun".split()
_BCHARS_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_QP_LINE_RE = re.compile(rb"^(?:[\x21-\x3c\x3e-\x7e \t]|=[0-9A-F]{2})*=?$")
_B64_LINE_RE = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")

ONCE = ("date", "from", "message-id")
"""Fields a Postlane message carries exactly once (RFC 5322, section 3.6; Message-ID is
only "should" there, but Postlane always writes one)."""
AT_MOST_ONCE = (
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "in-reply-to",
    "references",
    "subject",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
ADDRESS_FIELDS = ("from", "sender", "reply-to", "to", "cc", "bcc")
MSG_ID_LIST_FIELDS = ("in-reply-to", "references")
URI_LIST_FIELDS = (
    "list-unsubscribe",
    "list-subscribe",
    "list-help",
    "list-archive",
    "list-owner",
    "list-post",
)
CONTROLLED = (
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
"""Fields Postlane writes: a line over 78 characters that could have been folded is a fault."""
_CANONICAL = {"date": "Date", "from": "From", "message-id": "Message-ID"}


@dataclass(frozen=True)
class Field:
    """One header field as received: its name and its raw value (folding kept)."""

    name: str
    raw: bytes
    """Everything after the colon, CRLFs of folded lines included."""

    @property
    def value(self) -> str:
        """The unfolded value (CRLFs removed), leading and trailing white space stripped."""
        return unfold(self.raw).decode("utf-8", "surrogateescape").strip()

    @property
    def lines(self) -> list[bytes]:
        """The physical lines of the field, the first with its name."""
        return (self.name.encode() + b":" + self.raw).split(b"\r\n")


@dataclass
class _Report:
    problems: list[str] = field(default_factory=list)

    def add(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")


class InvalidWireMessage(AssertionError):
    """A message that reached the SMTP server breaks the wire rules (`check_message`)."""


def unfold(raw: bytes) -> bytes:
    """A field value with its folding CRLFs removed (RFC 5322, section 2.2.3)."""
    return raw.replace(b"\r\n", b"")


def split_message(raw: bytes) -> tuple[list[Field], bytes, list[str]]:
    """Header fields, body, and syntax faults of the header section."""
    problems: list[str] = []
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, body = raw.removesuffix(b"\r\n"), b""
    fields: list[Field] = []
    for number, line in enumerate(head.split(b"\r\n"), 1):
        if line[:1] in (b" ", b"\t"):
            if not fields:
                problems.append(f"header line {number}: a continuation line before any field")
            elif not line.strip(b" \t"):
                problems.append(f"header line {number}: a folded line with only white space")
            else:
                last = fields[-1]
                fields[-1] = Field(last.name, last.raw + b"\r\n" + line)
            continue
        match = _FIELD_NAME_RE.match(line)
        if not match:
            problems.append(f"header line {number}: not a header field: {line[:60]!r}")
            continue
        fields.append(Field(match.group(1).decode(), line[match.end() :]))
    return fields, body, problems


def headers(raw: bytes, name: str) -> list[Field]:
    """The fields named `name` (case-insensitive) of the message `raw`, in order."""
    fields, _, _ = split_message(raw)
    return [f for f in fields if f.name.lower() == name.lower()]


def check_message(raw: bytes, *, smtputf8: bool = False, eight_bit: bool = False) -> list[str]:
    """Every way `raw` breaks the rules; an empty list for a valid message.

    Args:
        raw: the bytes the server received after DATA (dot-unstuffed, CRLF line endings).
        smtputf8: the envelope said SMTPUTF8: UTF-8 is allowed in header fields.
        eight_bit: the envelope said BODY=8BITMIME: 8-bit body parts are allowed.
    """
    report = _Report()
    _check_lines(raw, report, smtputf8=smtputf8, eight_bit=eight_bit)
    fields, body, problems = split_message(raw)
    report.problems.extend(problems)
    counts: dict[str, int] = {}
    for f in fields:
        counts[f.name.lower()] = counts.get(f.name.lower(), 0) + 1
    for name in ONCE:
        if counts.get(name, 0) != 1:
            shown = _CANONICAL.get(name, name)
            report.add(shown, f"must appear exactly once, found {counts.get(name, 0)}")
    for name in AT_MOST_ONCE:
        if counts.get(name, 0) > 1:
            shown = _CANONICAL.get(name, name)
            report.add(shown, f"must appear at most once, found {counts[name]}")
    for f in fields:
        _check_field(f, report, smtputf8=smtputf8)
    _check_list_unsubscribe_post(fields, report)
    _check_mime(fields, body, report, where="message", eight_bit=eight_bit or smtputf8)
    return report.problems


def _check_lines(raw: bytes, report: _Report, *, smtputf8: bool, eight_bit: bool) -> None:
    if re.search(rb"\r(?!\n)|(?<!\r)\n", raw):
        report.add("line endings", "a bare CR or LF (every line must end with CRLF)")
    if not raw.endswith(b"\r\n"):
        report.add("line endings", "the message does not end with CRLF")
    if b"\x00" in raw:
        report.add("content", "a NUL octet")
    for number, line in enumerate(raw.split(b"\r\n"), 1):
        if len(line) > MAX_LINE:
            report.add(f"line {number}", f"{len(line)} octets, over the limit of {MAX_LINE}")
    head = raw.partition(b"\r\n\r\n")[0]
    if not head.isascii():
        if not smtputf8:
            report.add("header", "8-bit octets without SMTPUTF8 (RFC 6532)")
        else:
            try:
                head.decode("utf-8")
            except UnicodeDecodeError:
                report.add("header", "octets that are not UTF-8")
    if not raw.isascii() and not (smtputf8 or eight_bit) and head.isascii():
        report.add("body", "8-bit octets without BODY=8BITMIME (RFC 6152)")


def _check_field(f: Field, report: _Report, *, smtputf8: bool) -> None:
    name = f.name.lower()
    value = f.value
    where = f.name
    if name in CONTROLLED:
        for line in f.lines:
            if len(line) > RECOMMENDED_LINE and _foldable(line):
                report.add(where, f"a {len(line)}-character line that could fold: {line[:60]!r}")
    encoded = _ENCODED_WORD_ANYWHERE.findall(value)
    for line in f.lines if encoded else []:
        if len(line) > 76 and _ENCODED_WORD_ANYWHERE.search(line.decode("utf-8", "replace")):
            report.add(where, f"a {len(line)}-character line with an encoded-word, over 76")
    if name == "date":
        _check_date(value, report)
    elif name == "message-id":
        _check_msg_ids(where, value, report, smtputf8=smtputf8, single=True)
    elif name in MSG_ID_LIST_FIELDS:
        _check_msg_ids(where, value, report, smtputf8=smtputf8, single=False)
    elif name in URI_LIST_FIELDS:
        _check_uris(where, value, report)
    elif name in ADDRESS_FIELDS:
        _check_addresses(where, value, report, smtputf8=smtputf8)
        return  # encoded-words were checked where they stand (phrases only)
    elif name.startswith("content-") or name == "mime-version":
        if encoded:
            report.add(where, "an encoded-word in a MIME field (RFC 2047, section 5)")
        return
    if encoded and (name in MSG_ID_LIST_FIELDS or name in URI_LIST_FIELDS or name == "date"):
        report.add(where, f"an encoded-word where the syntax forbids one: {encoded[0]!r}")
    elif encoded and name != "message-id":
        for word in encoded:
            _check_encoded_word(where, word, report, phrase=False)


def _foldable(line: bytes) -> bool:
    """Does this line hold white space after its first item, i.e. a place it could fold?"""
    body = line.split(b":", 1)[1] if _FIELD_NAME_RE.match(line) else line
    return bool(re.search(rb"\S\s+\S", body.strip()))


def _check_date(value: str, report: _Report) -> None:
    text = " ".join(value.split())
    match = _DATE_RE.match(text)
    if not match:
        report.add("Date", f"{value!r} is not an RFC 5322 date-time")
        return
    dow, day, month, year, hh, mm, ss, sign, zh, zm = match.groups()
    try:
        offset = timedelta(hours=int(zh), minutes=int(zm)) * (-1 if sign == "-" else 1)
        when = datetime(
            int(year),
            _MONTHS.index(month) + 1,
            int(day),
            int(hh),
            int(mm),
            int(ss or 0),
            tzinfo=timezone(offset),
        )
    except ValueError as exc:
        report.add("Date", f"{value!r} is not a real time ({exc})")
        return
    if dow and _DAYS[when.weekday()] != dow:
        report.add("Date", f"{value!r}: the day of the week is wrong")


def _check_msg_ids(
    where: str, value: str, report: _Report, *, smtputf8: bool, single: bool
) -> None:
    items = value.split()
    if not items:
        report.add(where, "empty")
        return
    if single and len(items) != 1:
        report.add(where, f"{value!r} is not exactly one msg-id")
    pattern = _MSG_ID_RE_UTF8 if smtputf8 else _MSG_ID_RE
    for item in items:
        if "=?" in item:
            report.add(where, f"an encoded-word where a msg-id must be: {item[:60]!r}")
        elif not pattern.match(item):
            report.add(where, f"{item[:80]!r} is not a msg-id (RFC 5322, section 3.6.4)")


def _check_uris(where: str, value: str, report: _Report) -> None:
    if where.lower() == "list-post" and value.upper().startswith("NO"):
        return
    for item in (i.strip() for i in value.split(",")):
        if not (item.startswith("<") and item.endswith(">")):
            report.add(where, f"{item[:80]!r} is not a '<uri>' item (RFC 2369)")
            continue
        uri = item[1:-1]
        if "=?" in uri:
            report.add(where, f"an encoded-word inside a URI: {uri[:60]!r}")
        elif not _URI_RE.match(uri):
            report.add(where, f"{uri[:80]!r} is not a URI")


def list_unsubscribe_uris(raw: bytes) -> list[str]:
    """The URIs of the message's List-Unsubscribe, parsed per RFC 2369 (empty if none)."""
    found = headers(raw, "List-Unsubscribe")
    if not found:
        return []
    return [i.strip()[1:-1] for i in found[0].value.split(",")]


def _check_list_unsubscribe_post(fields: list[Field], report: _Report) -> None:
    post = [f for f in fields if f.name.lower() == "list-unsubscribe-post"]
    if not post:
        return
    if post[0].value != "List-Unsubscribe=One-Click":
        report.add("List-Unsubscribe-Post", f"{post[0].value!r} is not the RFC 8058 key")
    unsubscribe = [f for f in fields if f.name.lower() == "list-unsubscribe"]
    uris = [i.strip()[1:-1] for i in unsubscribe[0].value.split(",")] if unsubscribe else []
    if not any(u.lower().startswith("https:") for u in uris):
        report.add("List-Unsubscribe-Post", "needs an https URI in List-Unsubscribe (RFC 8058)")


def _check_addresses(where: str, value: str, report: _Report, *, smtputf8: bool) -> None:
    if not value:
        report.add(where, "empty")
        return
    for mailbox in _split_outside_quotes(value, ","):
        mailbox = mailbox.strip()
        if not mailbox:
            report.add(where, "an empty item in the address list")
            continue
        if mailbox.endswith(">"):
            start = mailbox.rfind("<")
            if start < 0:
                report.add(where, f"{mailbox!r}: '>' without '<'")
                continue
            _check_phrase(where, mailbox[:start].strip(), report)
            address = mailbox[start + 1 : -1]
        else:
            address = mailbox
        pattern = _ADDR_SPEC_RE_UTF8 if smtputf8 else _ADDR_SPEC_RE
        if "=?" in address:
            report.add(where, f"an encoded-word inside an address: {address!r}")
        elif not pattern.match(address):
            report.add(where, f"{address!r} is not an addr-spec")


def _check_phrase(where: str, phrase: str, report: _Report) -> None:
    for word in _split_outside_quotes(phrase, " "):
        if not word:
            continue
        if word.startswith('"'):
            if len(word) < 2 or not word.endswith('"'):
                report.add(where, f"{word!r}: an unclosed quoted string")
            elif "=?" in word and _ENCODED_WORD_ANYWHERE.search(word):
                report.add(where, f"{word!r}: an encoded-word inside a quoted string")
        elif word.startswith("=?"):
            _check_encoded_word(where, word, report, phrase=True)
        elif not re.match(rf"^[{_ATEXT}.]+$", word):
            report.add(where, f"{word!r} is not a word of a display name")


def _check_encoded_word(where: str, word: str, report: _Report, *, phrase: bool) -> None:
    match = _ENCODED_WORD_RE.fullmatch(word)
    if not match:
        report.add(where, f"{word[:80]!r} is not an encoded-word (RFC 2047)")
        return
    if len(word) > 75:
        report.add(where, f"an encoded-word of {len(word)} characters, over 75 (RFC 2047)")
    charset, kind, text = match.groups()
    try:
        codecs.lookup(charset)
    except LookupError:
        report.add(where, f"{word[:60]!r}: unknown charset {charset!r}")
        return
    try:
        if kind in "Bb":
            data = binascii.a2b_base64(text.encode(), strict_mode=True)
        else:
            if phrase and not _Q_PHRASE_RE.match(text):
                report.add(where, f"{word[:60]!r}: characters a phrase's Q encoding forbids")
            data = binascii.a2b_qp(text.encode(), header=True)
        data.decode(charset)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        report.add(where, f"{word[:60]!r} does not decode ({exc})")


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    items, current, quoted, escaped, angle = [], "", False, False, False
    for char in text:
        if escaped:
            current += char
            escaped = False
            continue
        if char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "<" and not quoted:
            angle = True
        elif char == ">" and not quoted:
            angle = False
        elif char == sep and not quoted and not angle:
            items.append(current)
            current = ""
            continue
        current += char
    items.append(current)
    return items


# -- MIME ----------------------------------------------------------------------------------


def _params(value: str) -> tuple[str, dict[str, str]] | None:
    """``type/subtype`` and its parameters (lower-case names), or None if it does not parse."""
    parts = _split_outside_quotes(value, ";")
    media = parts[0].strip().lower()
    if not re.match(r"^[!#$%&'*+\-.^_`|~0-9a-z]+/[!#$%&'*+\-.^_`|~0-9a-z]+$", media):
        return None
    params: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, val = part.strip().partition("=")
        name, val = name.strip().lower(), val.strip()
        if not eq or not _TOKEN_RE.match(name):
            return None
        if val.startswith('"'):
            if len(val) < 2 or not val.endswith('"'):
                return None
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        elif not _TOKEN_RE.match(val):
            return None
        params[name] = val
    return media, params


def _check_mime(
    fields: list[Field], body: bytes, report: _Report, *, where: str, eight_bit: bool
) -> None:
    by_name = {f.name.lower(): f.value for f in fields}
    if where == "message" and "content-type" in by_name:
        if by_name.get("mime-version", "").split("(")[0].strip() != "1.0":
            report.add("MIME-Version", "must be 1.0 in a MIME message")
    parsed = _params(by_name.get("content-type", "text/plain; charset=us-ascii"))
    if parsed is None:
        report.add(where, f"Content-Type {by_name.get('content-type')!r} does not parse")
        return
    media, params = parsed
    cte = by_name.get("content-transfer-encoding", "7bit").strip().lower()
    if cte not in ("7bit", "8bit", "binary", "quoted-printable", "base64"):
        report.add(where, f"unknown Content-Transfer-Encoding {cte!r}")
        return
    if cte == "binary":
        report.add(where, "binary Content-Transfer-Encoding needs BINARYMIME (RFC 3030)")
    if cte == "8bit" and not eight_bit:
        report.add(where, "8bit Content-Transfer-Encoding without BODY=8BITMIME")
    if media.startswith("multipart/"):
        if cte not in ("7bit", "8bit", "binary"):
            report.add(where, f"a multipart entity encoded as {cte} (RFC 2045, section 6.4)")
        _check_multipart(media, params, body, report, where=where, eight_bit=eight_bit)
        return
    if cte == "7bit" and not body.isascii():
        report.add(where, "8-bit octets in a 7bit part")
    decoded = body
    if cte == "quoted-printable":
        for number, line in enumerate(body.split(b"\r\n"), 1):
            if len(line) > 76:
                report.add(where, f"quoted-printable line {number} is over 76 characters")
            if not _QP_LINE_RE.match(line) or line.endswith((b" ", b"\t")):
                report.add(where, f"quoted-printable line {number} is malformed: {line[:60]!r}")
        decoded = binascii.a2b_qp(body)
    elif cte == "base64":
        lines = body.split(b"\r\n")
        for number, line in enumerate(lines, 1):
            if len(line) > 76 or not _B64_LINE_RE.match(line):
                report.add(where, f"base64 line {number} is malformed: {line[:60]!r}")
        joined = b"".join(lines)
        try:
            decoded = binascii.a2b_base64(joined, strict_mode=True) if joined else b""
        except binascii.Error as exc:
            report.add(where, f"base64 does not decode ({exc})")
            return
    if media.startswith("text/"):
        charset = params.get("charset", "us-ascii")
        try:
            decoded.decode(charset)
        except (LookupError, UnicodeDecodeError) as exc:
            report.add(where, f"the text does not decode as {charset!r} ({exc})")


def _check_multipart(
    media: str,
    params: dict[str, str],
    body: bytes,
    report: _Report,
    *,
    where: str,
    eight_bit: bool,
) -> None:
    boundary = params.get("boundary")
    if boundary is None:
        report.add(where, f"{media} without a boundary")
        return
    if not _BCHARS_RE.match(boundary):
        report.add(where, f"boundary {boundary!r} breaks RFC 2046 (1-70 bchars)")
    delimiter = b"--" + boundary.encode()
    lines = body.split(b"\r\n")
    parts: list[list[bytes]] = []
    current: list[bytes] | None = None
    closed = False
    for line in lines:
        stripped = line.rstrip(b" \t")
        if stripped == delimiter + b"--":
            if current is not None:
                parts.append(current)
            closed = True
            break
        if stripped == delimiter:
            if current is not None:
                parts.append(current)
            current = []
        elif current is not None:
            current.append(line)
    if not parts:
        report.add(where, f"{media} with no body part")
    if not closed:
        report.add(where, f"{media}: the close delimiter --{boundary}-- is missing")
    for i, part in enumerate(parts):
        raw = b"\r\n".join(part)
        fields, part_body, problems = split_message(raw)
        if not raw.startswith(b"\r\n") and b"\r\n\r\n" not in raw:
            fields, part_body, problems = split_message(raw + b"\r\n")
        if raw.startswith(b"\r\n"):  # no header fields: the part starts with its blank line
            fields, part_body, problems = [], raw[2:], []
        report.problems.extend(f"{where}.{i}: {p}" for p in problems)
        _check_mime(fields, part_body, report, where=f"{where}.{i}", eight_bit=eight_bit)
