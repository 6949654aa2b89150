"""Rendering a sequence for one recipient: Jinja2, sandboxed, strict about undefined names.

Everything is rendered when the sequence starts, so a template that does not render for a
recipient (a missing variable, a syntax error, an unsafe attribute) is refused before
anything is sent, and the workflow only carries finished text.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from postlane.errors import InvalidEmail
from postlane.sequences.models import RenderedMessage
from postlane.sequences.spec import ComposeStep, Recipient, SendStep, SequenceSpec, Template

# One environment per escaping mode; both are stateless once built and safe to share.
_TEXT = SandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
)
_HTML = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True, keep_trailing_newline=True)


def variables_for(
    spec: SequenceSpec, recipient: Recipient, *, unsubscribe_url: str = ""
) -> dict[str, Any]:
    """The names templates can use: the recipient's variables plus a few of Postlane's."""
    name = recipient.name or ""
    return {
        **recipient.variables,
        "recipient": {"address": recipient.address, "name": name},
        "email": recipient.address,
        "name": name,
        "first_name": name.split(" ")[0] if name else "",
        "sender": spec.sender,
        "unsubscribe_url": unsubscribe_url,
    }


def render_string(source: str, variables: dict[str, Any], *, field: str, html: bool = False) -> str:
    """Render one template string.

    Raises:
        InvalidEmail: naming `field`, when the template does not render.
    """
    env = _HTML if html else _TEXT
    try:
        return env.from_string(source).render(variables)
    except TemplateError as exc:
        raise InvalidEmail(field, f"template does not render: {exc}") from None


def render_template(
    template: Template, variables: dict[str, Any], *, field: str
) -> RenderedMessage:
    """Render a named template's subject and bodies."""
    return RenderedMessage(
        subject=render_string(template.subject, variables, field=f"{field}.subject").strip(),
        text=None
        if template.text is None
        else render_string(template.text, variables, field=f"{field}.text"),
        html=None
        if template.html is None
        else render_string(template.html, variables, field=f"{field}.html", html=True),
    )


def render_sequence(
    spec: SequenceSpec, recipient: Recipient, *, unsubscribe_url: str = ""
) -> tuple[dict[str, RenderedMessage], dict[str, str]]:
    """Every send step's content and every compose step's instructions, for one recipient.

    Raises:
        InvalidEmail: the first template that does not render, named by its field.
    """
    variables = variables_for(spec, recipient, unsubscribe_url=unsubscribe_url)
    rendered: dict[str, RenderedMessage] = {}
    instructions: dict[str, str] = {}
    for i, step in enumerate(spec.steps):
        if isinstance(step, SendStep):
            if step.template is not None:
                rendered[step.id] = render_template(
                    spec.templates[step.template], variables, field=f"templates.{step.template}"
                )
            else:
                rendered[step.id] = RenderedMessage(
                    subject=step.subject or "", text=step.text, html=step.html
                )
        elif isinstance(step, ComposeStep):
            instructions[step.id] = render_string(
                step.instructions, variables, field=f"steps.{i}.instructions"
            )
    return rendered, instructions
