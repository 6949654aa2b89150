"""Reading inbound mail: what a message is (reply, auto-reply, bounce, unsubscribe) and
which Postlane message it answers. Functions of the raw bytes (stdlib `email`) and of the
worker's token keys (`postlane.tokens`), which open sealed Message-IDs and unsubscribe tokens.

The order of the checks matters, because the kinds overlap on the wire:

1. A delivery status notification (``multipart/report; report-type=delivery-status``) is a
   bounce: hard when a recipient failed with a 5.x.x status, soft for 4.x.x or ``delayed``.
   The bounced Message-ID comes from the returned ``message/rfc822`` or
   ``text/rfc822-headers`` part. DSNs often say ``Auto-Submitted: auto-replied`` too, so
   they are looked at before auto-replies.
   A spam complaint (``multipart/report; report-type=feedback-report``, the Abuse Reporting
   Format of RFC 5965) is looked at first of all: its returned message is ours, found by
   its Message-ID like a DSN's, and the complaining recipient comes from the report's
   ``Original-Rcpt-To`` (or the returned message's ``To``).
2. A non-standard bounce (from MAILER-DAEMON or postmaster, or a subject such as
   "Undelivered Mail Returned to Sender") that quotes the original headers in its text.
3. A mail whose subject carries ``unsubscribe`` and a sequence's token (the
   ``List-Unsubscribe`` mailto Postlane offers) is an unsubscribe, if the token opens and
   the mail went to the sender the token was issued for.
4. Anything else must refer to a Postlane Message-ID through ``In-Reply-To`` (first) or
   ``References`` (newest first). It is an auto-reply when marked so (``Auto-Submitted``,
   ``X-Autoreply``, ``X-Autorespond``, ``Precedence: auto_reply|bulk|junk``, a null
   ``Return-Path``) or when its subject reads like one ("Out of Office", "Automatic
   reply", "Auto:"); otherwise it is a reply. An out-of-office never counts as a reply.
"""

from __future__ import annotations

import hashlib
import html
import re
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.parser import HeaderParser
from email.utils import getaddresses, parseaddr, parsedate_to_datetime

from postlane.ids import EMAIL_ID_PREFIX, SEQUENCE_ID_PREFIX, sequence_of_email
from postlane.sequences.models import MAX_THREAD_TEXT, InboundEvent, InboundKind
from postlane.tokens import TokenKeys, rejected_token

LEGACY_ONLY = TokenKeys(None)
"""Keys without a secret: only the legacy (unsealed) forms open. The default of the
functions below, for tests and tools; workers pass `TokenKeys.from_settings`."""

_MSGID_RE = re.compile(r"<[^<>\s]+>")
_QUOTED_MSGID_RE = re.compile(r"(?im)^[ \t>]*Message-ID:[ \t]*(<[^<>\s]+>)")
_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_DAEMON_RE = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|mailerdaemon)@", re.I)
_BOUNCE_SUBJECT_RE = re.compile(
    r"(undeliver|undelivered mail|returned mail|delivery status notification|"
    r"delivery (has )?failed|delivery failure|mail delivery failed|failure notice|"
    r"non[- ]?delivery|could not be delivered|unzustellbar|non remis)",
    re.I,
)
_SOFT_WORDS_RE = re.compile(
    r"(delayed|will (continue to )?retry|not yet been delivered|temporar|still trying)", re.I
)
_AUTO_SUBJECT_RE = re.compile(
    r"^\s*(out of (the )?office|automatic reply|auto[- ]?reply|autoreply|auto-response|"
    r"auto:|abwesenheit|réponse automatique|respuesta automática|risposta automatica|"
    r"automatisch antwoord|i am (currently )?out of|i'm (currently )?out of|on vacation|"
    r"away from (the )?office)",
    re.I,
)
_AUTO_PRECEDENCE = {"auto_reply", "bulk", "junk"}
_UNSUBSCRIBE_RE = re.compile(r"\bunsubscribe\b", re.I)
_ATTRIBUTION_RES = [
    re.compile(r"^On\b.{0,300}\bwrote:\s*$", re.I | re.S),
    re.compile(r"^Le\b.{0,300}\ba écrit\s*:\s*$", re.I | re.S),
    re.compile(r"^Am\b.{0,300}\bschrieb\b.{0,200}:\s*$", re.I | re.S),
    re.compile(r"^-{2,}\s*Original Message\s*-{2,}\s*$", re.I),
    re.compile(r"^_{10,}\s*$"),
    re.compile(r"^From:\s.*\b(Sent|Date):\s", re.I | re.S),  # Outlook's quoted header block
]


def classify(
    raw: bytes, *, received_at: datetime | None = None, keys: TokenKeys = LEGACY_ONLY
) -> InboundEvent | None:
    """The event an inbound message means, or None if it answers nothing of ours.

    Args:
        raw: the message as received (RFC 5322 bytes).
        received_at: when it arrived (e.g. the IMAP INTERNALDATE); default its Date header.
        keys: open sealed Message-IDs and tokens; one that fails to open is ignored (and
            logged as ``tokens.rejected``), as if the message referred to nothing of ours.

    Returns:
        A reply, auto-reply, bounce or unsubscribe event; None when the message refers to
        no Postlane Message-ID (and names no sequence's unsubscribe token), or when it is a
        delivery report that only says the mail was delivered.
    """
    msg = message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)  # policy.default always builds EmailMessage
    own_id = _header(msg, "Message-ID")
    found = _MSGID_RE.search(own_id)
    message_id = found.group(0) if found else _synthetic_id(raw)
    base = InboundEvent(
        kind=InboundKind.REPLY,
        message_id=message_id,
        from_address=parseaddr(_header(msg, "From"))[1],
        subject=" ".join(_header(msg, "Subject").split()),
        received_at=received_at or _date(msg),
    )
    if _is_feedback_report(msg):
        return _opened(_complaint(msg, base, keys), keys)
    if _is_report(msg):
        return _opened(_dsn(msg, base, keys), keys)
    if _looks_like_bounce(msg):
        bounce = _plain_bounce(msg, base, keys)
        if bounce is not None:
            return _opened(bounce, keys)
    unsubscribe = _unsubscribe(msg, base, keys)
    if unsubscribe is not None:
        return unsubscribe
    refers_to = _refers_to(msg, keys)
    if refers_to is None:
        return None
    kind = InboundKind.AUTO_REPLY if _is_auto_reply(msg) else InboundKind.REPLY
    event = base.model_copy(update={"kind": kind, "refers_to": refers_to, "text": body_text(msg)})
    return _opened(event, keys)


def _opened(event: InboundEvent | None, keys: TokenKeys) -> InboundEvent | None:
    """`event` with the email workflow its (already checked) `refers_to` names."""
    if event is None or not event.refers_to:
        return event
    return event.model_copy(
        update={"refers_to_workflow": keys.open_message_id(event.refers_to) or ""}
    )


# -- which Postlane message ------------------------------------------------------------------


def postlane_message_id(value: str, keys: TokenKeys = LEGACY_ONLY) -> str | None:
    """`value` if it is a Message-ID Postlane generated for an email, else None (also for
    one that fails to authenticate: it is logged, never acted on)."""
    workflow_id = keys.open_message_id(value)
    if workflow_id is None or not workflow_id.startswith(EMAIL_ID_PREFIX):
        return None
    return value.strip()


def _refers_to(msg: Message, keys: TokenKeys) -> str | None:
    """In-Reply-To first, then References newest first: the first Postlane Message-ID."""
    for candidate in _MSGID_RE.findall(_header(msg, "In-Reply-To")):
        if postlane_message_id(candidate, keys):
            return str(candidate)
    for candidate in reversed(_MSGID_RE.findall(_header(msg, "References"))):
        if postlane_message_id(candidate, keys):
            return str(candidate)
    return None


# -- bounces ---------------------------------------------------------------------------------


def _is_report(msg: Message) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type", "")).lower() == "delivery-status"
    )


def _dsn(msg: Message, base: InboundEvent, keys: TokenKeys) -> InboundEvent | None:
    """An RFC 3464 delivery status notification."""
    failed: list[str] = []
    delayed: list[str] = []
    refers_to: str | None = None
    recipient = ""
    returned: Message | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            for block in _status_blocks(part):
                action = _header(block, "Action").strip().lower()
                status = _status(_header(block, "Status"))
                if action == "failed" or status.startswith("5."):
                    recipient = recipient or _typed_address(_header(block, "Final-Recipient"))
                    failed.append(status or "5.0.0")
                elif action == "delayed" or status.startswith("4."):
                    delayed.append(status or "4.0.0")
        elif refers_to is None and ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                returned = inner[0]
                refers_to = _returned_id(inner[0], keys)
        elif refers_to is None and ctype == "text/rfc822-headers":
            headers = HeaderParser(policy=policy.default).parsestr(_text_of(part))
            returned = headers
            refers_to = _returned_id(headers, keys)
    if refers_to is None:
        refers_to = _refers_to(msg, keys) or _quoted_id(_all_text(msg), keys)
    if refers_to is None or not (failed or delayed):
        return None  # not ours, or a "delivered"/"relayed" report: nothing to act on
    return base.model_copy(
        update={
            "kind": InboundKind.BOUNCE,
            "refers_to": refers_to,
            "hard": bool(failed),
            "status": (failed or delayed)[0],
            "text": _report_text(msg),
            "original_sender": _first_address(returned, "From"),
            "original_recipient": recipient,
        }
    )


def _is_feedback_report(msg: Message) -> bool:
    return (
        msg.get_content_type() == "multipart/report"
        and str(msg.get_param("report-type", "")).lower() == "feedback-report"
    )


def _complaint(msg: Message, base: InboundEvent, keys: TokenKeys) -> InboundEvent | None:
    """An RFC 5965 feedback report (ARF): a recipient marked our message as spam.

    The report's ``message/feedback-report`` part names the feedback type and, usually,
    ``Original-Rcpt-To``; the third part returns the message (``message/rfc822``) or its
    headers (``text/rfc822-headers``), whose Message-ID says which email it was.
    """
    feedback: Message | None = None
    returned: Message | None = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/feedback-report" and feedback is None:
            blocks = _status_blocks(part)
            feedback = blocks[0] if blocks else None
        elif ctype in ("message/rfc822", "message/global") and returned is None:
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                returned = inner[0]
        elif ctype == "text/rfc822-headers" and returned is None:
            returned = HeaderParser(policy=policy.default).parsestr(_text_of(part))
    refers_to = _returned_id(returned, keys) if returned is not None else None
    if refers_to is None:
        refers_to = _refers_to(msg, keys) or _quoted_id(_all_text(msg), keys)
    if refers_to is None:
        return None  # a complaint about mail that is not ours
    recipient = ""
    if feedback is not None:
        recipient = _typed_address(_header(feedback, "Original-Rcpt-To"))
    recipient = recipient or _first_address(returned, "To")
    kind = _header(feedback, "Feedback-Type").strip().lower() if feedback is not None else ""
    return base.model_copy(
        update={
            "kind": InboundKind.COMPLAINT,
            "refers_to": refers_to,
            "hard": True,
            "status": kind or "abuse",
            "text": _report_text(msg),
            "original_sender": _first_address(returned, "From"),
            "original_recipient": recipient,
        }
    )


def _typed_address(value: str) -> str:
    """The address of a DSN/ARF field such as ``rfc822; bob@example.com`` (or a bare one)."""
    address = value.split(";", 1)[1] if ";" in value else value
    return parseaddr(address.strip())[1].lower()


def _first_address(headers: Message | None, name: str) -> str:
    if headers is None:
        return ""
    found = getaddresses([_header(headers, name)])
    return found[0][1].lower() if found and found[0][1] else ""


def _status_blocks(part: Message) -> list[Message]:
    """The per-message and per-recipient field blocks of a ``message/delivery-status``."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [b for b in payload if isinstance(b, Message)]
    # Some parsers leave it as text (e.g. an odd transfer encoding): split the blocks.
    text = payload if isinstance(payload, str) else ""
    parser = HeaderParser(policy=policy.default)
    return [parser.parsestr(block.strip() + "\n") for block in re.split(r"\n\s*\n", text)]


def _returned_id(headers: Message, keys: TokenKeys) -> str | None:
    candidates = _MSGID_RE.findall(_header(headers, "Message-ID"))
    return next((str(c) for c in candidates if postlane_message_id(c, keys)), None)


def _looks_like_bounce(msg: Message) -> bool:
    sender = parseaddr(_header(msg, "From"))[1]
    return bool(_DAEMON_RE.match(sender) or _BOUNCE_SUBJECT_RE.search(_header(msg, "Subject")))


def _plain_bounce(msg: Message, base: InboundEvent, keys: TokenKeys) -> InboundEvent | None:
    """A bounce without a machine-readable report: the original headers quoted as text."""
    text = _all_text(msg)
    refers_to = _quoted_id(text, keys)
    if refers_to is None:
        return None
    statuses = [".".join(m) for m in _STATUS_RE.findall(text) if m[0] in "45"]
    hard_codes = [s for s in statuses if s.startswith("5.")]
    if hard_codes:
        hard, status = True, hard_codes[0]
    elif statuses:
        hard, status = False, statuses[0]
    else:
        hard, status = not _SOFT_WORDS_RE.search(text), ""
    return base.model_copy(
        update={
            "kind": InboundKind.BOUNCE,
            "refers_to": refers_to,
            "hard": hard,
            "status": status,
            "text": _trim(text),
        }
    )


def _quoted_id(text: str, keys: TokenKeys) -> str | None:
    """The Postlane Message-ID quoted in a bounce's text. A quoted ``Message-ID:`` line
    decides when there is one (the quoted In-Reply-To names what the bounced message
    answered, not the message itself); otherwise any Postlane Message-ID in the text."""
    quoted = _QUOTED_MSGID_RE.findall(text)
    if quoted:
        return next((str(c) for c in quoted if postlane_message_id(c, keys)), None)
    for candidate in _MSGID_RE.findall(text):
        if postlane_message_id(candidate, keys):
            return str(candidate)
    return None


def _status(value: str) -> str:
    match = _STATUS_RE.search(value)
    return ".".join(match.groups()) if match else ""


# -- unsubscribes and auto-replies -----------------------------------------------------------


def _unsubscribe(msg: Message, base: InboundEvent, keys: TokenKeys) -> InboundEvent | None:
    """A mail to the ``List-Unsubscribe`` mailto: its subject names the sequence.

    A sealed token counts only in mail to the sender it was issued for: replayed to
    another sender's mailbox, it is ignored (and logged).
    """
    if not _UNSUBSCRIBE_RE.search(base.subject):
        return None
    opened = keys.open_unsubscribe_token(base.subject)
    if opened is None:
        return None
    sender, sequence = opened
    if not sequence.startswith(SEQUENCE_ID_PREFIX):
        return None
    if sender is not None and sender not in _delivered_to(msg):
        rejected_token("unsubscribe", base.subject, "mail to another sender than the token's")
        return None
    return base.model_copy(
        update={
            "kind": InboundKind.UNSUBSCRIBE,
            "refers_to": _refers_to(msg, keys),
            "refers_to_workflow": sequence,
            "text": body_text(msg),
        }
    )


def _delivered_to(msg: Message) -> set[str]:
    """The addresses a message was sent to, lower-case (``To``, ``Cc`` and the delivery
    headers a mailbox adds)."""
    values = [
        _header(msg, name) for name in ("To", "Cc", "Delivered-To", "X-Original-To", "Envelope-To")
    ]
    return {address.lower() for _, address in getaddresses(values) if address}


def _is_auto_reply(msg: Message) -> bool:
    auto_submitted = _header(msg, "Auto-Submitted").strip().lower()
    if auto_submitted and not auto_submitted.startswith("no"):
        return True
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder"):
        value = _header(msg, name).strip().lower()
        if name in msg and value not in ("no", "false", "0"):
            return True
    if _header(msg, "Precedence").strip().lower() in _AUTO_PRECEDENCE:
        return True
    if "Return-Path" in msg and _header(msg, "Return-Path").strip() == "<>":
        return True  # RFC 3834: automatic responses go out with a null reverse path
    return bool(_AUTO_SUBJECT_RE.match(_header(msg, "Subject")))


# -- text ------------------------------------------------------------------------------------


def body_text(msg: Message) -> str:
    """The start of a message's own plain text: charset decoded, quoted lines and the
    quoted previous message dropped, at most `MAX_THREAD_TEXT` characters."""
    part = _first_part(msg, "text/plain")
    if part is not None:
        text = _text_of(part)
    else:
        html_part = _first_part(msg, "text/html")
        text = _html_to_text(_text_of(html_part)) if html_part is not None else ""
    return _trim(strip_quoted(text))


def strip_quoted(text: str) -> str:
    """Drop ``>`` quoted lines and everything from a reply's attribution line on."""
    lines = text.replace("\r\n", "\n").split("\n")
    kept: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        two_lines = f"{stripped} {lines[i + 1].strip()}" if i + 1 < len(lines) else stripped
        if kept and any(r.match(stripped) or r.match(two_lines) for r in _ATTRIBUTION_RES):
            break
        if stripped.startswith(">"):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept).strip()


def _first_part(msg: Message, ctype: str) -> Message | None:
    """The first `ctype` part that is the message's own body (no attachment, nothing
    inside an attached message)."""
    stack: list[Message] = [msg]
    while stack:
        part = stack.pop(0)
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                stack = [p for p in payload if isinstance(p, Message)] + stack
            continue
        if part.get_content_type() == ctype and part.get_content_disposition() != "attachment":
            return part
    return None


def _text_of(part: Message) -> str:
    """A text part's content as str, whatever its charset (unknown charsets: UTF-8)."""
    try:
        if isinstance(part, EmailMessage):
            content = part.get_content()
            if isinstance(content, str):
                return content
    except (LookupError, ValueError, AssertionError):
        pass
    data = part.get_payload(decode=True)
    if isinstance(data, bytes):
        return data.decode(part.get_content_charset() or "utf-8", errors="replace")
    payload = part.get_payload()
    return payload if isinstance(payload, str) else ""


def _all_text(msg: Message) -> str:
    """Every text part and the headers of attached messages, for bounce sniffing."""
    chunks: list[str] = []
    for part in msg.walk():
        if part is msg:
            continue
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], Message):
                chunks.append(
                    "".join(f"{k}: {v}\n" for k, v in inner[0].items())
                )  # the returned message's headers
        elif part.get_content_maintype() == "text" or ctype == "message/delivery-status":
            chunks.append(_text_of(part) if not part.is_multipart() else "")
    if not msg.is_multipart():
        chunks.append(_text_of(msg))
    return "\n".join(chunks)


def _report_text(msg: Message) -> str:
    part = _first_part(msg, "text/plain")
    return _trim(_text_of(part)) if part is not None else ""


def _html_to_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style|blockquote)\b.*?</\1>", " ", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</p>|</div>", "\n", markup)
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def _trim(text: str) -> str:
    text = re.sub(r"\n{3,}", "\n\n", text.strip())
    return text[:MAX_THREAD_TEXT]


# -- headers ---------------------------------------------------------------------------------


def _header(msg: Message, name: str) -> str:
    """A header's decoded value, or "" (malformed headers never raise here)."""
    try:
        value = msg.get(name)
    except (ValueError, IndexError, TypeError):
        return ""
    return "" if value is None else str(value)


def _date(msg: Message) -> datetime | None:
    try:
        when = parsedate_to_datetime(_header(msg, "Date"))
    except (TypeError, ValueError, IndexError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _synthetic_id(raw: bytes) -> str:
    """A stable stand-in for a message without a Message-ID: the same bytes, the same ID,
    so a message fetched twice is still recognised as one."""
    return f"<sha256.{hashlib.sha256(raw).hexdigest()[:32]}@postlane.invalid>"


def route(event: InboundEvent, keys: TokenKeys = LEGACY_ONLY) -> str | None:
    """The sequence workflow an inbound event belongs to, from the Message-ID it refers to
    (or, for a mailto unsubscribe, the token in its subject).

    Both are opened again with `keys`, so an event built elsewhere (a webhook) is held to
    the same check; `refers_to_workflow` is not taken on trust.
    """
    if event.kind == InboundKind.UNSUBSCRIBE:
        opened = keys.open_unsubscribe_token(event.subject)
        if opened is not None:
            return opened[1]
    if event.kind == InboundKind.COMPLAINT:
        return None  # the reputation guard's (activities/inbound.py), not a sequence's
    if not event.refers_to:
        return None
    workflow_id = keys.open_message_id(event.refers_to)
    return sequence_of_email(workflow_id) if workflow_id else None
