"""Turning an `Email` into the MIME message that goes over the wire."""

from __future__ import annotations

from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime

from postlane.models import Email

_POLICY = policy.default.clone(cte_type="7bit")
"""Bodies are encoded 7-bit clean (quoted-printable or base64 for non-ASCII text): the
activity does not negotiate 8BITMIME, and RFC 6152 forbids 8-bit data without it."""


def build_message(email: Email, message_id: str, date: datetime) -> EmailMessage:
    """The RFC 5322 message for `email`. Bcc recipients are envelope-only, never a header."""
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = email.sender
    msg["To"] = ", ".join(email.to)
    if email.cc:
        msg["Cc"] = ", ".join(email.cc)
    if email.reply_to:
        msg["Reply-To"] = email.reply_to
    msg["Subject"] = email.subject
    msg["Message-ID"] = message_id
    msg["Date"] = format_datetime(date)
    for name, value in email.headers.items():
        msg[name] = value
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
