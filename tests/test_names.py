"""Every name that crosses a process boundary comes from `postlane.names`: the handlers a
workflow registers are exactly the names its message class lists, and every activity a
worker registers is named there."""

from __future__ import annotations

import ast
from pathlib import Path

from temporalio import workflow

from postlane import names
from workflows import WORKFLOWS

ROOT = Path(__file__).resolve().parent.parent

MESSAGES = {
    names.WorkflowType.SEND_EMAIL: names.EmailMessages,
    names.WorkflowType.LANE: names.LaneMessages,
    names.WorkflowType.SEQUENCE: names.SequenceMessages,
    names.WorkflowType.SUPPRESSION: names.SuppressionMessages,
    names.WorkflowType.INBOX_WATCHER: names.InboxMessages,
    names.WorkflowType.WEBHOOK_DELIVERY: names.WebhookMessages,
}


def _values(cls: type) -> set[str]:
    return {v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}


def test_each_workflow_registers_exactly_its_listed_messages() -> None:
    assert {defn.__temporal_workflow_definition.name for defn in WORKFLOWS} == set(MESSAGES)  # type: ignore[attr-defined]
    for cls in WORKFLOWS:
        defn = workflow._Definition.from_class(cls)
        assert defn is not None
        handled = {*defn.signals, *defn.queries, *defn.updates} - {None}
        assert handled == _values(MESSAGES[defn.name]), defn.name


def test_no_bare_name_strings_in_handlers_or_activity_definitions() -> None:
    """``@workflow.signal(name="x")`` or ``@activity.defn(name="x")`` with a literal would
    be a second definition of a wire name; they must use `postlane.names`."""
    offenders = []
    for path in [*ROOT.glob("workflows/*.py"), *ROOT.glob("activities/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in {"signal", "query", "update", "defn"}:
                    for kw in node.keywords:
                        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                            offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_names_module_imports_only_the_standard_library() -> None:
    tree = ast.parse((ROOT / "postlane" / "names.py").read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert imported <= {"__future__", "typing"}
