"""Per-domain backoff in the lane's workflow, in virtual time: the order of its steps.

The server's side (the weights on a real queue) is tested on the dev server in
tests/test_routing.py; the rates are measured by bench/domain_backoff.py.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata

from postlane.ids import lane_workflow_id
from postlane.lanes.models import DomainReport, LaneStatus
from postlane.names import LaneMessages
from postlane.testing import PostlaneTestEnv
from tests.procs import assert_eventually


async def _status(pl: PostlaneTestEnv) -> LaneStatus:
    handle = pl.client.temporal.get_workflow_handle(lane_workflow_id("test"))
    return await handle.query(LaneMessages.STATUS, result_type=LaneStatus)


async def _rate_requests(pl: PostlaneTestEnv) -> list[dict[str, Any]]:
    """What the lane asked the server for, in order: its `set_lane_rate` inputs."""
    history = await pl.client.temporal.get_workflow_handle(lane_workflow_id("test")).fetch_history()
    return [
        json.loads(e.activity_task_scheduled_event_attributes.input.payloads[0].data)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == "set_lane_rate"
    ]


async def test_a_domain_steps_down_on_each_complaint_and_back_up_step_by_step(
    pl: PostlaneTestEnv,
) -> None:
    lane = pl.client.temporal.get_workflow_handle(lane_workflow_id("test"))
    report = DomainReport(domain="slow.test", reply="421 4.7.0 slow down")
    await lane.signal(LaneMessages.DOMAIN_THROTTLED, report)
    await lane.signal(LaneMessages.DOMAIN_THROTTLED, report)  # within 10 s: the same event
    await pl.sleep(timedelta(seconds=20))
    await lane.signal(LaneMessages.DOMAIN_THROTTLED, report)
    await pl.sleep(timedelta(seconds=5))
    status = await _status(pl)
    assert [(d.domain, d.weight) for d in status.domains] == [("slow.test", 0.25)]
    assert status.effective_rate == status.configured_rate  # the lane itself keeps its pace
    await pl.sleep(timedelta(minutes=3))
    assert (await _status(pl)).domains == []

    requests = await _rate_requests(pl)
    if not requests[0]["domain_weights"]:
        requests = requests[1:]  # the configured rate, applied before the first report came
    weights = [r["domain_weights"] for r in requests]
    rate = status.configured_rate
    # Down by half per complaint, up by double per quiet minute, then the override goes.
    assert weights == [{"slow.test": 0.5}, {"slow.test": 0.25}, {"slow.test": 0.5}, {}]
    assert requests[-1]["clear_domains"] == ["slow.test"]
    # The per-key limit the weight scales: the lane's rate while a domain is held back
    # (no per_domain_per_second configured), none again after.
    assert [r["per_domain_per_second"] for r in requests] == [rate, rate, rate, None]
    assert {r["rate_per_second"] for r in requests} == {rate}


def test_lanes_domains_lists_domains_in_backoff_and_circuits_not_closed() -> None:
    from datetime import UTC, datetime

    from postlane.cli.routing import format_domains
    from postlane.lanes.models import DomainStatus, LaneReport

    since = datetime(2026, 11, 27, 21, 0, tzinfo=UTC)
    primary = LaneStatus(
        name="primary",
        configured_rate=10,
        effective_rate=10,
        domains=[
            DomainStatus(
                domain="slow.test",
                weight=0.25,
                effective_rate=0.5,
                since=since,
                reason="throttled",
                last_reply="421 4.7.0 slow down",
                recover_at=since + timedelta(minutes=1),
            )
        ],
        circuit="open",
        circuit_since=since,
        circuit_reason="Connect call failed",
        failover="backup",
    )
    backup = LaneStatus(name="backup", configured_rate=5, effective_rate=5)
    text = format_domains(
        [LaneReport(name="primary", status=primary), LaneReport(name="backup", status=backup)]
    )
    lines = text.splitlines()
    assert lines[0].split() == [
        "LANE",
        "DOMAIN",
        "WEIGHT",
        "RATE/s",
        "SINCE",
        "REASON",
        "NEXT",
        "STEP",
    ]
    assert lines[1].split()[:4] == ["primary", "slow.test", "0.25", "0.5"]
    assert "421 4.7.0 slow down" in lines[1]
    assert lines[2] == (
        "lane primary: circuit open since 2026-11-27 21:00:00Z, sends go to lane backup"
        " (Connect call failed)"
    )
    assert len(lines) == 3  # backup has no failover and no domain in backoff
    assert format_domains([LaneReport(name="backup", status=backup)]) == "no domain is in backoff"


def test_workers_route_an_email_started_without_a_lane_and_keep_an_explicit_one() -> None:
    from activities.resolve import resolve
    from postlane.config import LaneConfig, RouteConfig, Settings
    from postlane.email.models import LaneQuery

    settings = Settings(
        lanes=[
            LaneConfig(name="main", senders=["*"], smtp_host="x"),
            LaneConfig(name="bulk", senders=["*@bulk.test"], smtp_host="x"),
        ],
        routes=[RouteConfig(name="bulk-mail", lane="bulk", priority="bulk")],
    )
    # Started by a client in another language, with no lane: the rule applies.
    routed = resolve(settings, LaneQuery(sender="a@acme.test", priority="bulk"))
    assert (routed.lane, routed.route) == ("bulk", "bulk-mail")
    # The Python client routed it already: the same lane, and the rule is named.
    same = resolve(settings, LaneQuery(sender="a@acme.test", lane="bulk", priority="bulk"))
    assert (same.lane, same.route) == ("bulk", "bulk-mail")
    # A lane named explicitly (an operator's retry --lane) is kept.
    kept = resolve(settings, LaneQuery(sender="a@acme.test", lane="main", priority="bulk"))
    assert (kept.lane, kept.route) == ("main", "")
    plain = resolve(settings, LaneQuery(sender="a@acme.test", priority="normal"))
    assert (plain.lane, plain.route) == ("main", "")


async def test_a_paused_lane_keeps_saying_so_in_its_details_through_domain_backoff(
    pl: PostlaneTestEnv,
) -> None:
    """The Web UI's details of a paused lane still lead with the pause after a domain
    backoff republishes them (they once replaced it)."""
    lane = pl.client.temporal.get_workflow_handle(lane_workflow_id("test"))
    await pl.client.lanes.pause("test", reason="investigating a complaint")
    report = DomainReport(domain="slow.test", reply="421 4.7.0 slow down")
    await lane.signal(LaneMessages.DOMAIN_THROTTLED, report)

    async def details() -> str | None:
        metadata = await lane.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        shown = metadata.current_details
        return shown if "domains in backoff" in shown else None

    shown = await assert_eventually(details, what="the lane's details after the backoff")
    assert shown.splitlines() == [
        "PAUSED by operator: investigating a complaint",
        "circuit: closed",
        "domains in backoff: slow.test x0.5",
    ]
