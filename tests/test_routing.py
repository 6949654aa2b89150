"""Routing on the real dev server with real SMTP servers on sockets: per-domain backoff on
the lane queue's fairness weights, failover when a provider dies, and ``[[routes]]``.

No timing assertions: the rates a domain in backoff gets are measured by
``bench/domain_backoff.py`` (bench/results/domain_backoff.md).

Record the replay histories of the new paths again with::

    POSTLANE_RECORD_HISTORIES=1 .venv/bin/pytest tests/test_routing.py
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities import smtp as smtp_module
from postlane.cli.routing import format_domains
from postlane.client import PostlaneClient
from postlane.config import LaneConfig, RouteConfig, Settings, load_settings
from postlane.dev.catcher import CaughtMessage, SmtpCatcher
from postlane.email.models import Email, EmailStatus, RetrySettings
from postlane.errors import ConfigurationError
from postlane.ids import lane_workflow_id
from postlane.lanes.models import LaneStatus
from postlane.names import LaneMessages
from postlane.tokens import TokenKeys
from tests.procs import assert_eventually, describe_lane_queue
from tests.test_integration import new_lane
from tests.test_lane_rates import in_process_workers

pytestmark = pytest.mark.devserver

HISTORIES = Path(__file__).parent / "histories"
FAST = RetrySettings(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=2))


async def lane_status(client: Client, lane: str) -> LaneStatus:
    return await client.get_workflow_handle(lane_workflow_id(lane)).query(
        LaneMessages.STATUS, result_type=LaneStatus
    )


def message_ids(*servers: SmtpCatcher) -> Counter[str]:
    """Message-IDs as the servers received them (raw bytes), with how often each came."""
    caught: list[CaughtMessage] = [m for s in servers for m in s.messages]
    return Counter(m.header("Message-ID") for m in caught)


async def record(client: Client, workflow_id: str, name: str) -> None:
    """Write the workflow's history to tests/histories/<name>.json (when recording)."""
    if os.environ.get("POSTLANE_RECORD_HISTORIES"):
        history = await client.get_workflow_handle(workflow_id).fetch_history()
        (HISTORIES / f"{name}.json").write_text(history.to_json())


@pytest.mark.timeout(180)
async def test_a_throttling_domain_gets_a_lower_weight_on_the_server_and_the_other_does_not(
    dev_env: WorkflowEnvironment, key: str
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp, per_domain_per_second=10, retry=FAST)
        settings = Settings(lanes=[lane])
        pl = PostlaneClient(client, settings)
        for n in range(3):
            smtp.reject_recipient(f"r{n}@slow.test", "421 4.7.0 too many messages, slow down")
        async with in_process_workers(client, settings):
            slow = [
                await pl.send(
                    Email(sender="a@it.test", to=[f"r{n}@slow.test"], subject="s", text="hi"),
                    key=f"{key}-slow-{n}",
                )
                for n in range(3)
            ]
            fast = [
                await pl.send(
                    Email(sender="a@it.test", to=[f"r{n}@fast.test"], subject="f", text="hi"),
                    key=f"{key}-fast-{n}",
                )
                for n in range(3)
            ]

            async def weighted() -> Any:
                desc = await describe_lane_queue(client, lane)
                weights = dict(desc.config.fairness_weight_overrides)
                return desc.config if weights.get("slow.test", 1.0) < 1.0 else None

            config = await assert_eventually(weighted, within=60, what="slow.test's weight")
            # Ground truth on the server: only the throttling domain is held back, under the
            # per-domain limit the lane configures.
            weights = dict(config.fairness_weight_overrides)
            assert set(weights) == {"slow.test"} and 0 < weights["slow.test"] <= 0.5
            rate = config.fairness_keys_rate_limit_default.rate_limit.requests_per_second
            assert rate == pytest.approx(10)
            # The other domain went out meanwhile, at its pace, while slow.test was refused.
            for handle in fast:
                assert (await handle.result()).accepted
            assert {m.recipients[0] for m in smtp.messages} == {f"r{n}@fast.test" for n in range(3)}
            status = await lane_status(client, lane.name)
            assert [d.domain for d in status.domains] == ["slow.test"]
            assert status.domains[0].reason == "throttled"
            assert status.domains[0].weight <= 0.5
            assert status.domains[0].effective_rate == pytest.approx(10 * status.domains[0].weight)
            assert "4.7.0" in status.domains[0].last_reply
            # The lane as a whole did not slow down: only the domain did.
            assert status.effective_rate == status.configured_rate
            table = format_domains(await pl.lanes.list())
            assert "slow.test" in table and "fast.test" not in table

            smtp.clear_script()  # the domain accepts again: its emails go out, once each
            for handle in slow:
                await handle.result()
            received = message_ids(smtp)
            assert len(received) == 6 and set(received.values()) == {1}
            await record(client, lane_workflow_id(lane.name), "lane_domain_backoff")


@pytest.mark.timeout(300)
async def test_a_primary_killed_mid_batch_fails_over_once_each_and_the_circuit_closes(
    dev_env: WorkflowEnvironment, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers read the circuit afresh for every send (not up to a second old), so a send
    # made after the circuit closed goes to the primary for certain.
    monkeypatch.setattr(smtp_module, "CIRCUIT_FRESH", 0.0)
    client = dev_env.client
    primary, backup = SmtpCatcher().start(), SmtpCatcher().start()
    restarted: SmtpCatcher | None = None
    try:
        backup_lane = new_lane(backup, senders=["*@backup.test"])
        lane = new_lane(
            primary,
            smtp_port=primary.port,
            failover=backup_lane.name,
            failover_after=2,
            circuit_probe_seconds=3,
            smtp_timeout=2,
            max_concurrent=1,
            retry=FAST,
        )
        settings = Settings(lanes=[lane, backup_lane])
        pl = PostlaneClient(client, settings)
        # After three emails the next transaction waits at MAIL, so the kill finds it
        # there, not in DATA (a 250 to DATA lost with the server would make the email's
        # fate unknowable, and its retry on the backup a duplicate).
        primary.hold("mail", after=3)
        async with in_process_workers(client, settings):
            handles = [
                await pl.send(
                    Email(sender="a@it.test", to=[f"u{n}@example.test"], subject="x", text="hi"),
                    key=f"{key}-{n}",
                )
                for n in range(12)
            ]
            await assert_eventually(
                lambda: primary.held, within=60, what="the fourth email held at MAIL"
            )
            assert len(primary.messages) == 3
            primary.stop()  # the provider dies mid-batch

            async def opened() -> LaneStatus | None:
                status = await lane_status(client, lane.name)
                return status if status.circuit != "closed" else None

            await assert_eventually(opened, within=60, what="the primary's circuit to open")
            receipts = [await h.result() for h in handles]

            # Ground truth: the raw bytes both servers received. Every email arrived exactly
            # once across the two, with the Message-ID it had on the primary.
            keys = TokenKeys.from_settings(settings)
            expected = {keys.message_id(h.workflow_id, "it.test") for h in handles}
            received = message_ids(primary, backup)
            assert set(received) == expected
            assert set(received.values()) == {1}, received
            assert backup.messages, "nothing failed over"
            assert primary.messages
            moved = [
                h for h, r in zip(handles, receipts, strict=True) if r.lane == backup_lane.name
            ]
            assert len(moved) == len(backup.messages)
            report = await pl.describe(moved[0].key)
            assert report.failed_over_from == lane.name and report.lane == backup_lane.name
            assert report.status == EmailStatus.SENT
            await record(client, moved[0].workflow_id, "send_email_failed_over")

            # While the primary is down, a probe fails and the circuit opens again.
            async def reopened() -> LaneStatus | None:
                status = await lane_status(client, lane.name)
                failed = status.circuit == "open" and "probe failed" in status.circuit_reason
                return status if failed else None

            await assert_eventually(reopened, within=60, what="a failed probe")
            # The primary comes back: a probe closes the circuit and new sends go to it.
            restarted = SmtpCatcher(port=primary.port).start()

            async def closed() -> LaneStatus | None:
                status = await lane_status(client, lane.name)
                return status if status.circuit == "closed" else None

            await assert_eventually(closed, within=90, what="the circuit to close again")
            later = [
                await pl.send(
                    Email(sender="a@it.test", to=[f"v{n}@example.test"], subject="y", text="hi"),
                    key=f"{key}-later-{n}",
                )
                for n in range(3)
            ]
            for h in later:
                assert (await h.result()).lane == lane.name
            assert len(restarted.messages) == 3
            assert len(backup.messages) == len(moved)
            await record(client, lane_workflow_id(lane.name), "lane_circuit")
    finally:
        for server in (primary, backup, restarted):
            if server is not None:
                server.stop()


@pytest.mark.timeout(120)
async def test_routes_choose_the_lane_and_the_email_status_names_the_rule(
    dev_env: WorkflowEnvironment, key: str
) -> None:
    client = dev_env.client
    with SmtpCatcher() as main, SmtpCatcher() as bulk, SmtpCatcher() as warm:
        main_lane = new_lane(main)
        bulk_lane = new_lane(bulk, senders=["*@bulk.test"])
        warm_lane = new_lane(warm, senders=["*@warm.test"])
        settings = Settings(
            lanes=[main_lane, bulk_lane, warm_lane],
            routes=[
                RouteConfig(name="newsletters", lane=bulk_lane.name, tag="newsletter"),
                RouteConfig(lane=warm_lane.name, recipient_domain=["gmail.com"]),
                RouteConfig(lane=bulk_lane.name, priority="bulk"),
            ],
        )
        pl = PostlaneClient(client, settings)
        async with in_process_workers(client, settings):
            tagged = await pl.send(
                Email(
                    sender="a@it.test",
                    to=["x@gmail.com"],
                    subject="t",
                    text="hi",
                    tags=["newsletter"],
                ),
                key=f"{key}-tagged",
            )
            gmail = await pl.send(
                Email(sender="a@it.test", to=["y@gmail.com"], subject="g", text="hi"),
                key=f"{key}-gmail",
            )
            low = await pl.send(
                Email(sender="a@it.test", to=["z@example.test"], subject="b", text="hi"),
                key=f"{key}-bulk",
                priority="bulk",
            )
            plain = await pl.send(
                Email(sender="a@it.test", to=["w@example.test"], subject="p", text="hi"),
                key=f"{key}-plain",
            )
            for h in (tagged, gmail, low, plain):
                await h.result()
            # First match wins: the tagged gmail.com email goes by the newsletter rule.
            assert sorted(m.recipients[0] for m in bulk.messages) == [
                "x@gmail.com",
                "z@example.test",
            ]
            assert [m.recipients[0] for m in warm.messages] == ["y@gmail.com"]
            assert [m.recipients[0] for m in main.messages] == ["w@example.test"]
            reports = {h: await pl.describe(h.key) for h in (tagged, gmail, low, plain)}
            assert (reports[tagged].route, reports[tagged].lane) == ("newsletters", bulk_lane.name)
            assert (reports[gmail].route, reports[gmail].lane) == ("routes[1]", warm_lane.name)
            assert (reports[low].route, reports[low].lane) == ("routes[2]", bulk_lane.name)
            assert (reports[plain].route, reports[plain].lane) == (None, main_lane.name)


def test_route_rules_match_on_every_condition_given() -> None:
    lanes = [
        LaneConfig(name="a", senders=["*"], smtp_host="x"),
        LaneConfig(name="b", senders=["*@b.test"], smtp_host="x"),
    ]
    settings = Settings(
        lanes=lanes,
        routes=[RouteConfig(lane="b", sender="*@news.test", recipient_domain=["*.edu"])],
    )
    assert settings.route_for("n@news.test", ["mit.edu"], [], "normal") == (lanes[1], "routes[0]")
    assert settings.route_for("n@news.test", ["gmail.com"], [], "normal") is None
    assert settings.route_for("n@other.test", ["mit.edu"], [], "normal") is None


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[[routes]]\nlane = "nowhere"\ntag = "x"\n', ":11: routes.0.lane: 'nowhere'"),
        ('failover = "nowhere"\n', ":4: lanes.0.failover: 'nowhere'"),
    ],
)
def test_an_unknown_lane_in_routes_or_failover_is_refused_naming_the_field(
    tmp_path: Path, extra: str, where: str
) -> None:
    text = '[[lanes]]\nname = "a"\nsenders = ["*"]\nsmtp_host = "x"\n'
    if extra.startswith("failover"):
        text = text.replace('smtp_host = "x"\n', f'{extra}smtp_host = "x"\n')
    else:
        text += '\n[[lanes]]\nname = "b"\nsenders = ["*@b.test"]\nsmtp_host = "x"\n' + extra
    file = tmp_path / "postlane.toml"
    file.write_text(text)
    with pytest.raises(ConfigurationError) as exc:
        load_settings(file)
    assert where in str(exc.value)
    assert "is not another configured lane" in str(exc.value)
