"""An example compose-step agent: asks an OpenAI-compatible chat endpoint for a draft.

Run it in the workflow worker::

    OPENAI_API_KEY=... postlane worker --agent examples.llm_agent:compose

The key stays in the worker's environment; only the draft enters workflow history.
Postlane validates the draft like any email and, when the step says ``approval = true``,
holds it for ``postlane sequence approve KEY STEP``. Tests use the deterministic
`postlane.testing.fake_compose` under the same activity name instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

from temporalio import activity

from postlane.sequences.agent import COMPOSE_ACTIVITY, ComposeRequest, Draft

ENDPOINT = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1") + "/chat/completions"
MODEL = os.environ.get("POSTLANE_AGENT_MODEL", "gpt-4o-mini")


@activity.defn(name=COMPOSE_ACTIVITY)
async def compose(request: ComposeRequest) -> Draft:
    """Draft the next email of the thread; Postlane retries this activity on errors."""
    thread = "\n\n".join(f"[{m.direction}] {m.subject}\n{m.text}" for m in request.thread)
    prompt = (
        f"You write one short email from {request.sender} to "
        f"{request.recipient.name or request.recipient.address}.\n"
        f"Instructions: {request.instructions}\n"
        f"Conversation so far:\n{thread or '(none)'}\n"
        + (f"Your previous draft was refused: {request.feedback}\n" if request.feedback else "")
        + 'Answer with JSON: {"subject": "...", "text": "..."}'
    )
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "response_format": {"type": "json_object"},
        }
    ).encode()
    http = urllib.request.Request(
        ENDPOINT,
        data=body,
        headers={
            "Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}",
            "Content-Type": "application/json",
        },
    )
    raw = await asyncio.to_thread(lambda: urllib.request.urlopen(http, timeout=60).read())
    content = json.loads(raw)["choices"][0]["message"]["content"]
    return Draft.model_validate_json(content)
