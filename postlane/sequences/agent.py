"""The agent interface of ``compose`` steps: an activity that turns a thread into a draft.

Write an async function that takes a `ComposeRequest` and returns a `Draft`, decorate it
with ``@activity.defn(name="compose_email")`` (or the name your step's ``activity`` says),
and give it to the worker: ``postlane worker --agent mypkg.agent:compose``. Postlane calls
it with the conversation so far (what was sent, what they replied), validates the draft
like any email (an invalid one is asked for again, with `ComposeRequest.feedback` saying
why), holds it for a person's ``approve`` signal when the step asks, then sends it.

The agent runs as an activity: it may call an LLM, read files, take its time (the step's
``timeout``), and is retried on failure. Keep secrets (API keys) in the worker's
environment; they never enter workflow history. See ``examples/llm_agent.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from postlane.errors import ConfigurationError
from postlane.names import Activity
from postlane.sequences.models import ComposeRequest, Draft, ThreadMessage

COMPOSE_ACTIVITY = Activity.COMPOSE_EMAIL
"""Default activity name of a compose step."""


def load_agent(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (an ``@activity.defn`` function) for the worker.

    Raises:
        ConfigurationError: it cannot be imported or is not an activity.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--agent {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"--agent {spec!r}: {exc}") from None
    if not hasattr(fn, "__temporal_activity_definition"):
        raise ConfigurationError(f"--agent {spec!r}: not decorated with @activity.defn")
    return fn  # type: ignore[no-any-return]


__all__ = ["COMPOSE_ACTIVITY", "ComposeRequest", "Draft", "ThreadMessage", "load_agent"]
