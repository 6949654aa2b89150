"""A deterministic stand-in for an LLM agent, under the real compose activity name."""

from __future__ import annotations

from temporalio import activity

from postlane.sequences.agent import COMPOSE_ACTIVITY
from postlane.sequences.models import ComposeRequest, Draft

INVALID_MARKER = "[[invalid]]"
"""Instructions containing this get a draft that fails validation on the first attempt."""


@activity.defn(name=COMPOSE_ACTIVITY)
async def fake_compose(request: ComposeRequest) -> Draft:
    """Answer the thread the same way every time: ``Re: <last subject>`` and a body that
    names the recipient, quotes the instructions and counts the messages so far.

    Instructions containing ``[[invalid]]`` get a subject with a line break first (an
    invalid email), so tests can see a bad draft asked for again with feedback.
    """
    last = request.thread[-1].subject if request.thread else "Hello"
    subject = last if last.lower().startswith("re:") else f"Re: {last}"
    if INVALID_MARKER in request.instructions and request.feedback is None:
        subject = "broken\nsubject"
    name = request.recipient.name or request.recipient.address
    text = (
        f"Hi {name},\n\n{request.instructions.replace(INVALID_MARKER, '').strip()}\n\n"
        f"(draft {request.attempt}, after {len(request.thread)} messages)"
    )
    return Draft(subject=subject, text=text)
