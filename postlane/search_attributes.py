"""Postlane's custom search attributes: what the Web UI and `list` queries filter on.

Register them once per namespace (`postlane dev` does; `postlane setup` does it on a real
cluster). A workflow that upserts an unregistered attribute fails its workflow tasks.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from postlane.email.models import Email

STATUS = SearchAttributeKey.for_keyword("PostlaneStatus")
LANE = SearchAttributeKey.for_keyword("PostlaneLane")
RECIPIENT_DOMAIN = SearchAttributeKey.for_keyword_list("PostlaneRecipientDomain")
TAG = SearchAttributeKey.for_keyword_list("PostlaneTag")
PARKED_AT = SearchAttributeKey.for_datetime("PostlaneParkedAt")
"""When the email last parked in ``dead_letter`` (workflow time). Emails that parked under
workflow code older than this attribute do not have it."""

RECIPIENT_HASH = SearchAttributeKey.for_keyword_list("PostlaneRecipientHash")
"""Keyed hashes of the recipient addresses (`postlane.erasure`): what ``postlane forget``
finds an address's emails and sequences by, without the address being readable here."""

ALL = (STATUS, LANE, RECIPIENT_DOMAIN, TAG, PARKED_AT, RECIPIENT_HASH)


def email_attributes(
    email: Email,
    lane: str,
    status: str,
    *,
    recipient_domain: bool = True,
    recipient_hashes: list[str] | None = None,
) -> TypedSearchAttributes:
    """The attributes an email workflow starts with (a client's send or a sequence's step).

    Args:
        recipient_domain: index the recipients' domains; when False the attribute is empty
            (``recipient_domain_attribute = false`` in the settings).
        recipient_hashes: `RECIPIENT_HASH` values, when the starter holds the token secret;
            otherwise left out, and the email's workflow sets them itself.
    """
    hashed = [SearchAttributePair(RECIPIENT_HASH, recipient_hashes)] if recipient_hashes else []
    return TypedSearchAttributes(
        [
            *hashed,
            SearchAttributePair(STATUS, status),
            SearchAttributePair(LANE, lane),
            SearchAttributePair(
                RECIPIENT_DOMAIN, email.recipient_domains if recipient_domain else []
            ),
            SearchAttributePair(TAG, list(email.tags)),
        ]
    )


def email_summary(email: Email) -> str:
    """The Web UI's one-line summary of an email: ``subject → first recipients``."""
    shown = ", ".join(email.recipients[:3]) + (" …" if len(email.recipients) > 3 else "")
    return f"{email.subject} → {shown}"
