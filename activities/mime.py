"""Turning an `Email` into the bytes that go over the wire.

Postlane writes the top-level header fields itself, and leaves only the MIME body
(``MIME-Version``, ``Content-*`` and the parts) to Python's email package. The package
folds any header with an unbroken token over 78 characters into RFC 2047 encoded-words,
which turns ``In-Reply-To``, ``References`` and ``List-Unsubscribe`` into values no mail
client or provider can parse. Here:

- ``Message-ID``, ``In-Reply-To`` and ``References`` are plain msg-ids (RFC 5322, section
  3.6.4), folded only between msg-ids; ``List-*`` URL headers are ``<uri>`` lists (RFC 2369),
  folded only after a comma; ``List-Unsubscribe-Post`` is written as is (RFC 8058).
- Address headers are ``display-name <addr-spec>`` lists folded between mailboxes; a display
  name is an atom run, a quoted string, or RFC 2047 encoded-words when it is not ASCII
  (section 5 (3)). Addresses themselves are never encoded (an address with a non-ASCII
  local part is written in UTF-8, and needs SMTPUTF8).
- ``Subject`` and other unstructured fields fold at white space; when not ASCII (or when a
  word would not fit in a 998-octet line) they become encoded-words (section 5 (1)).
- Lines stay within 78 characters wherever a folding point exists, and never exceed 998.
"""

from __future__ import annotations

import re
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime

from postlane.email.models import MSG_ID_HEADERS, URI_LIST_HEADERS, Email

MAX_LINE = 78
"""RFC 5322's recommended line length (section 2.1.1), excluding CRLF."""
HARD_MAX_LINE = 998
"""RFC 5322's line length limit, excluding CRLF."""
_ENCODED_WORD_MAX = 66
"""Characters of one encoded-word: ``Subject: `` plus one stays within 76 (RFC 2047, 2)."""

_BODY_POLICY = policy.SMTP.clone(cte_type="7bit", max_line_length=76)
"""Bodies are encoded 7-bit clean (quoted-printable or base64 for non-ASCII text): the
activity does not negotiate 8BITMIME, and RFC 6152 forbids 8-bit data without it. The
package writes quoted-printable lines as long as `max_line_length`, and RFC 2045 (6.7)
allows 76."""

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ATOM_RUN_RE = re.compile(rf"^{_ATOM}(?: {_ATOM})*$")
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
"""Characters an encoded-word in a phrase may carry unencoded (RFC 2047, section 5 (3));
the strictest set, used everywhere."""
_MSG_ID_RE = re.compile(r"<[^<>\s]+>")
_URI_RE = re.compile(r"<[^<>]+>")


def render_message(email: Email, message_id: str, date: datetime) -> bytes:
    """The RFC 5322 message for `email`, CRLF line endings, ready for DATA.

    Bcc recipients are envelope-only, never a header. The bytes are 7-bit unless an
    address has a non-ASCII local part (`Email.smtputf8_address`), which is written in
    UTF-8 (RFC 6532) and needs a server that offers SMTPUTF8.
    """
    fields = [
        _address_field("From", [email.sender], email),
        _address_field("To", email.to, email),
    ]
    if email.cc:
        fields.append(_address_field("Cc", email.cc, email))
    if email.reply_to:
        fields.append(_address_field("Reply-To", [email.reply_to], email))
    fields.append(_unstructured("Subject", email.subject))
    fields.append(f"Date: {format_datetime(date)}")
    fields.append(f"Message-ID: {message_id}")
    for name, value in email.headers.items():
        fields.append(_custom_field(name, value))
    head = "".join(f"{field}\r\n" for field in fields).encode("utf-8")
    return head + _body(email).as_bytes(policy=_BODY_POLICY)


def build_message(email: Email, message_id: str, date: datetime) -> EmailMessage:
    """`render_message`, parsed back (for callers that want an `EmailMessage`).

    Serialise the bytes from `render_message`, not this object: Python's email package
    would refold the headers on the way out.
    """
    from email import message_from_bytes

    parsed = message_from_bytes(render_message(email, message_id, date), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _body(email: Email) -> EmailMessage:
    msg = EmailMessage(policy=_BODY_POLICY)
    if email.text:
        msg.set_content(email.text)
    if email.html:
        if email.text:
            msg.add_alternative(email.html, subtype="html")
        else:
            msg.set_content(email.html, subtype="html")
    for attachment in email.attachments:
        maintype, subtype = attachment.content_type.split("/", 1)
        msg.add_attachment(
            attachment.content, maintype=maintype, subtype=subtype, filename=attachment.filename
        )
    return msg


# -- folding ------------------------------------------------------------------------------


def fold(name: str, items: list[str], *, separator: str = "", break_after_name: bool) -> str:
    """``name: item1<separator> item2 ...`` as one field, folded (CRLF + space) only between
    items, so that lines stay within `MAX_LINE` unless a single item is longer.

    Args:
        name: the field name.
        items: the unbreakable pieces, in order.
        separator: written right after every item but the last (``","`` for lists).
        break_after_name: the field's syntax allows folding white space right after the
            colon, so a first item too long for the first line may start on the next.
    """
    pieces = [item + separator for item in items[:-1]] + items[-1:]
    # RFC 2047, section 2: a line that holds an encoded-word stays within 76 characters.
    limit = MAX_LINE - 2 if any("=?" in piece for piece in pieces) else MAX_LINE
    lines: list[str] = []
    line = f"{name}:"
    first = True
    for piece in pieces:
        fits = len(line) + 1 + len(piece) <= limit
        if not fits and (not first or break_after_name):
            lines.append(line)
            line = ""
        line = f"{line} {piece}"
        first = False
    lines.append(line)
    return "\r\n".join(lines)


def _address_field(name: str, addresses: list[str], email: Email) -> str:
    items: list[str] = []
    for i, address in enumerate(addresses):
        words = _phrase(email.display_names.get(address))
        words.append(f"<{address}>" if words else address)
        if i < len(addresses) - 1:
            words[-1] += ","
        whole = " ".join(words)
        # A mailbox folds inside (between its words) only when it cannot fit on a line.
        room = (MAX_LINE - 2 if "=?" in whole else MAX_LINE) - 1  # a continuation line
        items.extend([whole] if len(whole) <= room else words)
    return fold(name, items, break_after_name=True)


def _phrase(name: str | None) -> list[str]:
    """A display name as words that may be folded between (RFC 5322 phrase)."""
    if not name:
        return []
    if "=?" in name:  # text that reads as an encoded-word must be encoded (RFC 2047, 5)
        return _encoded_words(name)
    if _ATOM_RUN_RE.match(name):
        return name.split(" ")
    if name.isascii():
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if len(quoted) <= _ENCODED_WORD_MAX:
            return [quoted]
        # A quoted string does not fold; a long one goes as encoded-words, which do.
    # Words that are atoms stay readable; runs of the others become encoded-words, with
    # the spaces inside them, since a decoder drops white space between encoded-words.
    words: list[str] = []
    run: list[str] = []
    for word in name.split(" "):
        if _ATOM_RUN_RE.match(word) and word.isascii():
            if run:
                words.extend(_encoded_words(" ".join(run)))
                run = []
            words.append(word)
        else:
            run.append(word)
    if run:
        words.extend(_encoded_words(" ".join(run)))
    return words


def _unstructured(name: str, value: str) -> str:
    """An unstructured field (RFC 5322, section 3.2.5), folded before white space so that
    unfolding gives back the text (leading and trailing white space of an ASCII value
    dropped; encoded-words keep everything)."""
    text = value.strip()
    if not text:
        return f"{name}:"
    tokens = re.findall(r"[ \t]*[^ \t]+", text)
    if (
        not text.isascii()
        or "=?" in text
        or any(len(name) + 2 + len(t) > HARD_MAX_LINE for t in tokens)
    ):
        # Non-ASCII, text a reader would take for an encoded-word, or a word no line could
        # hold: encoded-words carry the text exactly (RFC 2047, section 5 (1)).
        return fold(name, _encoded_words(value), break_after_name=True)
    lines: list[str] = []
    line = f"{name}: {tokens[0]}"
    for token in tokens[1:]:
        if len(line) + len(token) > MAX_LINE:
            lines.append(line)
            line = token  # starts with the white space it folds at
        else:
            line += token
    lines.append(line)
    return "\r\n".join(lines)


def _custom_field(name: str, value: str) -> str:
    lower = name.lower()
    if lower in MSG_ID_HEADERS:
        # A foreign RFC 6532 Message-ID cannot be written in a 7-bit message; threading
        # falls back to the other IDs.
        ids = [mid for mid in _MSG_ID_RE.findall(value) if mid.isascii()]
        return fold(name, ids, break_after_name=False) if ids else f"{name}:"
    if lower in URI_LIST_HEADERS:
        return fold(name, _URI_RE.findall(value), separator=",", break_after_name=False)
    if lower == "list-unsubscribe-post":
        return f"{name}: {value.strip()}"
    return _unstructured(name, value)


def _encoded_words(text: str) -> list[str]:
    """`text` as UTF-8 "Q" encoded-words of at most `_ENCODED_WORD_MAX` characters each,
    never splitting a character, and split after a space where one is near (RFC 2047,
    sections 2 and 5): decoders that keep the white space between encoded-words then
    still see whole words."""
    prefix, suffix = "=?utf-8?q?", "?="
    budget = _ENCODED_WORD_MAX - len(prefix) - len(suffix)
    chunks: list[str] = []
    current = ""
    for word in re.findall(r"[^ ]* ?|[^ ]+", text):
        if not word:
            continue
        encoded = _q(word)
        if current and len(current) + len(encoded) > budget:
            chunks.append(current)
            current = ""
        if len(encoded) <= budget:
            current += encoded
            continue
        for char in word:  # a word longer than one encoded-word: split between characters
            piece = _q(char)
            if current and len(current) + len(piece) > budget:
                chunks.append(current)
                current = ""
            current += piece
    if current or not chunks:
        chunks.append(current)
    return [prefix + chunk + suffix for chunk in chunks]


def _q(text: str) -> str:
    return "".join(
        "_" if b == 0x20 else chr(b) if b in _Q_SAFE else f"={b:02X}" for b in text.encode()
    )
