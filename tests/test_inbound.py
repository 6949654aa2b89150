"""Inbound classification: real-looking replies, out-of-office answers, DSNs and plain
bounces, unsubscribes, and mail that is none of our business."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from postlane.ids import email_workflow_id, message_id, sequence_workflow_id, unsubscribe_token
from postlane.inbound.classify import classify, route, strip_quoted
from postlane.sequences.models import MAX_THREAD_TEXT, InboundKind

FIRST = message_id(email_workflow_id("trial-zoe:first"), "acme.test")
"""What the sequence ``trial-zoe`` sent in its step ``first``."""
FOLLOW_UP = message_id(email_workflow_id("trial-zoe:follow-up"), "acme.test")
FOREIGN = "<CAF=3x+Yq8@mail.gmail.com>"


def raw(text: str) -> bytes:
    """Messages are written with LF here and sent with CRLF, as on the wire."""
    return text.lstrip("\n").replace("\n", "\r\n").encode()


GMAIL_REPLY = raw(f"""
Return-Path: <zoe@example.test>
Delivered-To: agent@acme.test
MIME-Version: 1.0
Date: Mon, 24 Nov 2025 10:12:03 +0100
References: {FIRST}
In-Reply-To: {FIRST}
Message-ID: <CAHx9Lw2+reply@mail.gmail.com>
Subject: Re: Your trial
From: =?UTF-8?Q?Zo=C3=AB_Martin?= <zoe@example.test>
To: Agent <agent@acme.test>
Content-Type: multipart/alternative; boundary="000000000000a1b2c3"

--000000000000a1b2c3
Content-Type: text/plain; charset="UTF-8"
Content-Transfer-Encoding: quoted-printable

Yes, let=E2=80=99s talk on Thursday.
=E2=80=94 Zo=C3=AB

On Mon, 24 Nov 2025 at 09:00, Agent <agent@acme.test>
wrote:

> Hi Zo=C3=AB, how is the trial going?
>
> Agent

--000000000000a1b2c3
Content-Type: text/html; charset="UTF-8"
Content-Transfer-Encoding: quoted-printable

<div dir=3D"ltr">Yes, let=E2=80=99s talk on Thursday.<br>=E2=80=94 Zo=C3=AB</div>

--000000000000a1b2c3--
""")

EXCHANGE_OOO = raw(f"""
Received: from EX01.corp.example.test (10.0.0.5) by EX02.corp.example.test
Subject: Automatic reply: Your trial
From: Sam Lee <sam@corp.example.test>
To: Agent <agent@acme.test>
Date: Mon, 24 Nov 2025 09:00:07 +0000
Message-ID: <a1b2c3d4e5@EX01.corp.example.test>
In-Reply-To: {FIRST}
References: {FIRST}
Auto-Submitted: auto-generated
X-MS-Exchange-Inbox-Rules-Loop: sam@corp.example.test
X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent
Content-Type: text/plain; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable
MIME-Version: 1.0

I am out of the office until 1 December with limited access to e-mail.
For urgent matters please contact J=FCrgen.
""")

POSTFIX_DSN = raw(f"""
Return-Path: <>
Date: Mon, 24 Nov 2025 09:00:02 +0000 (UTC)
From: MAILER-DAEMON@mx.acme.test (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: agent@acme.test
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="3F2A1C0123.1763974802/mx.acme.test"
Message-Id: <20251124090002.9B1A8C0456@mx.acme.test>

This is a MIME-encapsulated message.

--3F2A1C0123.1763974802/mx.acme.test
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.acme.test.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<nobody@example.test>: host mx.example.test[192.0.2.10] said: 550 5.1.1
    <nobody@example.test>: Recipient address rejected: User unknown (in reply
    to RCPT TO command)

--3F2A1C0123.1763974802/mx.acme.test
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.acme.test
X-Postfix-Queue-ID: 3F2A1C0123
X-Postfix-Sender: rfc822; agent@acme.test
Arrival-Date: Mon, 24 Nov 2025 09:00:01 +0000 (UTC)

Final-Recipient: rfc822; nobody@example.test
Original-Recipient: rfc822;nobody@example.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.test
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.test>: Recipient address
    rejected: User unknown

--3F2A1C0123.1763974802/mx.acme.test
Content-Description: Undelivered Message
Content-Type: message/rfc822

From: agent@acme.test
To: nobody@example.test
Subject: Your trial
Message-ID: {FOLLOW_UP}
In-Reply-To: {FIRST}
References: {FIRST}
Date: Mon, 24 Nov 2025 09:00:00 +0000
Content-Type: text/plain; charset="utf-8"

Hi, how is the trial going?

--3F2A1C0123.1763974802/mx.acme.test--
""")


def delay_dsn(action: str = "delayed", status: str = "4.4.1") -> bytes:
    """A Sendmail-style warning: returns only the headers (text/rfc822-headers)."""
    return raw(f"""
From: Mail Delivery Subsystem <MAILER-DAEMON@relay.acme.test>
To: <agent@acme.test>
Subject: Warning: could not send message for past 4 hours
Message-Id: <202511241300.5AOD0abc@relay.acme.test>
Auto-Submitted: auto-generated (warning-timeout)
MIME-Version: 1.0
Content-Type: multipart/report; report-type="delivery-status";
    boundary="5AOD0abc.1763989200/relay.acme.test"

--5AOD0abc.1763989200/relay.acme.test
Content-Type: text/plain

    **********************************************
    **      THIS IS A WARNING MESSAGE ONLY      **
    **  YOU DO NOT NEED TO RESEND YOUR MESSAGE  **
    **********************************************

--5AOD0abc.1763989200/relay.acme.test
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.acme.test

Final-Recipient: RFC822; zoe@slow.example.test
Action: {action}
Status: {status}
Will-Retry-Until: Fri, 28 Nov 2025 09:00:00 GMT

--5AOD0abc.1763989200/relay.acme.test
Content-Type: text/rfc822-headers

From: agent@acme.test
To: zoe@slow.example.test
Subject: Your trial
Message-ID: {FIRST}

--5AOD0abc.1763989200/relay.acme.test--
""")


QMAIL_BOUNCE = raw(f"""
Return-Path: <>
Date: 24 Nov 2025 09:05:00 -0000
From: MAILER-DAEMON@mail.example.test
To: agent@acme.test
Subject: failure notice
Message-ID: <20251124090500.4321.qmail@mail.example.test>

Hi. This is the qmail-send program at mail.example.test.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<gone@example.test>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.

Return-Path: <agent@acme.test>
From: agent@acme.test
To: gone@example.test
Subject: Your trial
In-Reply-To: {FIRST}
Message-ID: {FOLLOW_UP}

Hi, how is the trial going?
""")

EXIM_DELAY = raw(f"""
From: Mail Delivery System <Mailer-Daemon@mx.example.test>
To: agent@acme.test
Subject: Warning: message 1vAbCd-0001xY-Qz delayed 24 hours
Message-Id: <E1vAbCd-0009zz-AA@mx.example.test>

This message was created automatically by mail delivery software.
A message that you sent has not yet been delivered to one or more of its
recipients after more than 24 hours on the queue on mx.example.test.

The message identifier is:     1vAbCd-0001xY-Qz
The subject of the message is: Your trial

The address to which the message has not yet been delivered is:

  zoe@busy.example.test

No action is required on your part. Delivery attempts will continue for
some time, and this warning may be repeated at intervals if the message
remains undelivered. Eventually the mail delivery software will give up.

------ This is a copy of the message's headers. ------

Message-ID: {FIRST}
From: agent@acme.test
""")


def unsubscribe_mail(token: str) -> bytes:
    """What a mail client sends for ``List-Unsubscribe: <mailto:agent@acme.test?...>``."""
    return raw(f"""
From: zoe@example.test
To: agent@acme.test
Subject: unsubscribe {token}
Message-ID: <unsub-1@example.test>
Date: Mon, 24 Nov 2025 11:00:00 +0000
Content-Type: text/plain

This message was automatically generated by Gmail.
""")


def simple_reply(
    headers: str,
    body: str = "Sounds good.",
    subject: str = "Re: Your trial",
    message_id: str = "<r-1@example.test>",
) -> bytes:
    return raw(
        f"From: zoe@example.test\nTo: agent@acme.test\nSubject: {subject}\n"
        f"Message-ID: {message_id}\n{headers}\n"
        f"Content-Type: text/plain; charset=utf-8\n\n{body}\n"
    )


# -- replies ---------------------------------------------------------------------------------


def test_classify_gmail_reply_routes_to_sequence_with_own_text() -> None:
    event = classify(GMAIL_REPLY)
    assert event is not None
    assert event.kind == InboundKind.REPLY
    assert event.refers_to == FIRST
    assert event.message_id == "<CAHx9Lw2+reply@mail.gmail.com>"
    assert event.from_address == "zoe@example.test"
    assert event.subject == "Re: Your trial"
    # charset decoded; the attribution line (wrapped over two lines) and the quote dropped
    assert event.text == "Yes, let’s talk on Thursday.\n— Zoë"
    assert event.received_at == datetime(2025, 11, 24, 9, 12, 3, tzinfo=UTC)
    assert route(event) == sequence_workflow_id("trial-zoe")


def test_classify_received_at_given_wins_over_date_header() -> None:
    at = datetime(2025, 11, 24, 9, 30, tzinfo=UTC)
    event = classify(GMAIL_REPLY, received_at=at)
    assert event is not None and event.received_at == at


def test_classify_in_reply_to_wins_over_references() -> None:
    headers = f"In-Reply-To: {FIRST}\nReferences: {FIRST} {FOLLOW_UP}"
    event = classify(simple_reply(headers))
    assert event is not None and event.refers_to == FIRST


def test_classify_references_newest_postlane_id_first() -> None:
    headers = f"In-Reply-To: {FOREIGN}\nReferences: {FIRST}\n {FOLLOW_UP}\n {FOREIGN}"
    event = classify(simple_reply(headers))
    assert event is not None
    assert event.kind == InboundKind.REPLY
    assert event.refers_to == FOLLOW_UP


def test_classify_mail_answering_nothing_of_ours_is_none() -> None:
    assert classify(simple_reply(f"In-Reply-To: {FOREIGN}\nReferences: {FOREIGN}")) is None
    assert classify(simple_reply("")) is None
    # a pl.-looking ID that does not encode an email workflow is not ours either
    lane_like = message_id("lane:default", "acme.test")
    assert classify(simple_reply(f"In-Reply-To: {lane_like}")) is None


def test_classify_latin1_reply_decoded_and_quote_stripped() -> None:
    body = "Gr=FC=DFe, gern!\n\n-----Original Message-----\nFrom: agent@acme.test\n"
    message = raw(
        f"From: jurgen@example.test\nTo: agent@acme.test\nSubject: AW: Your trial\n"
        f"Message-ID: <x@example.test>\nIn-Reply-To: {FIRST}\nMIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=iso-8859-1\n"
        f"Content-Transfer-Encoding: quoted-printable\n\n{body}"
    )
    event = classify(message)
    assert event is not None and event.text == "Grüße, gern!"


def test_classify_html_only_reply_becomes_text() -> None:
    message = raw(
        f"From: zoe@example.test\nSubject: Re: Your trial\nMessage-ID: <h@example.test>\n"
        f"In-Reply-To: {FIRST}\nContent-Type: text/html; charset=utf-8\n\n"
        "<html><body><p>Call me &amp; we&#39;ll see.</p>"
        "<blockquote>old text</blockquote></body></html>"
    )
    event = classify(message)
    assert event is not None and event.text == "Call me & we'll see."


def test_classify_text_is_capped() -> None:
    event = classify(simple_reply(f"In-Reply-To: {FIRST}", body="word " * 5000))
    assert event is not None and len(event.text) == MAX_THREAD_TEXT


def test_classify_without_message_id_gets_a_stable_one() -> None:
    message = raw(f"From: zoe@example.test\nIn-Reply-To: {FIRST}\n\nok\n")
    first, again = classify(message), classify(message)
    assert first is not None and again is not None
    assert first.message_id == again.message_id
    assert first.message_id.endswith("@postlane.invalid>")


def test_strip_quoted_keeps_text_before_quotes() -> None:
    text = "Fine by me.\n> quoted\n>> deeper\nThanks\n\nLe lun. 24 nov. 2025, Agent a écrit :\n> x"
    assert strip_quoted(text) == "Fine by me.\nThanks"


# -- auto-replies ----------------------------------------------------------------------------


def test_classify_exchange_out_of_office_is_auto_reply_not_reply() -> None:
    event = classify(EXCHANGE_OOO)
    assert event is not None
    assert event.kind == InboundKind.AUTO_REPLY
    assert event.refers_to == FIRST
    assert "contact Jürgen" in event.text
    assert route(event) == sequence_workflow_id("trial-zoe")


@pytest.mark.parametrize(
    ("headers", "subject"),
    [
        ("Auto-Submitted: auto-replied", "Re: Your trial"),
        ("X-Autoreply: yes", "Re: Your trial"),
        ("X-Autorespond: Your trial", "Re: Your trial"),
        ("Precedence: auto_reply", "Re: Your trial"),
        ("Precedence: bulk", "Re: Your trial"),
        ("Precedence: junk", "Re: Your trial"),
        ("Return-Path: <>", "Re: Your trial"),
        ("", "Out of Office: Your trial"),
        ("", "Out of the office re: Your trial"),
        ("", "Automatic reply: Your trial"),
        ("", "Auto: Your trial"),
        ("", "Autoreply: Your trial"),
        ("", "Abwesenheitsnotiz: Your trial"),
        ("", "Réponse automatique : Your trial"),
    ],
)
def test_classify_auto_reply_markers(headers: str, subject: str) -> None:
    event = classify(simple_reply(f"In-Reply-To: {FIRST}\n{headers}".strip(), subject=subject))
    assert event is not None
    assert event.kind == InboundKind.AUTO_REPLY


def test_classify_auto_submitted_no_is_a_person() -> None:
    event = classify(simple_reply(f"In-Reply-To: {FIRST}\nAuto-Submitted: no"))
    assert event is not None and event.kind == InboundKind.REPLY


# -- bounces ---------------------------------------------------------------------------------


def test_classify_postfix_dsn_is_hard_bounce_of_returned_message() -> None:
    event = classify(POSTFIX_DSN)
    assert event is not None
    assert event.kind == InboundKind.BOUNCE  # not an auto-reply despite Auto-Submitted
    assert event.hard is True
    assert event.status == "5.1.1"
    assert event.refers_to == FOLLOW_UP  # the returned message, not what it answered
    assert "could not" in event.text
    assert route(event) == sequence_workflow_id("trial-zoe")


def test_classify_delay_dsn_with_headers_only_is_soft_bounce() -> None:
    event = classify(delay_dsn())
    assert event is not None
    assert event.kind == InboundKind.BOUNCE
    assert event.hard is False
    assert event.status == "4.4.1"
    assert event.refers_to == FIRST


def test_classify_failed_dsn_status_decides_hardness() -> None:
    event = classify(delay_dsn(action="failed", status="5.7.1 (delivery not authorized)"))
    assert event is not None and event.hard is True and event.status == "5.7.1"


def test_classify_success_dsn_is_nothing_to_act_on() -> None:
    assert classify(delay_dsn(action="delivered", status="2.0.0")) is None


def test_classify_qmail_bounce_reads_quoted_message_id() -> None:
    event = classify(QMAIL_BOUNCE)
    assert event is not None
    assert event.kind == InboundKind.BOUNCE
    assert event.hard is True
    assert event.status == "5.1.1"
    # the quoted In-Reply-To names the earlier message; the Message-ID line wins
    assert event.refers_to == FOLLOW_UP


def test_classify_exim_delay_warning_is_soft_bounce() -> None:
    event = classify(EXIM_DELAY)
    assert event is not None
    assert event.kind == InboundKind.BOUNCE
    assert event.hard is False
    assert event.refers_to == FIRST


def test_classify_bounce_of_foreign_mail_is_none() -> None:
    assert classify(QMAIL_BOUNCE.replace(FOLLOW_UP.encode(), FOREIGN.encode())) is None


# -- unsubscribes ----------------------------------------------------------------------------


def test_classify_mailto_unsubscribe_names_the_sequence() -> None:
    token = unsubscribe_token(sequence_workflow_id("trial-zoe"))
    event = classify(unsubscribe_mail(token))
    assert event is not None
    assert event.kind == InboundKind.UNSUBSCRIBE
    assert event.from_address == "zoe@example.test"
    assert route(event) == sequence_workflow_id("trial-zoe")


def test_classify_unsubscribe_with_a_bogus_token_is_none() -> None:
    assert classify(unsubscribe_mail("pl-zzzz")) is None
    assert classify(unsubscribe_mail("please")) is None
