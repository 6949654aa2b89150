"""Metrics, health endpoints and JSON logs of a real worker process, read by a real
Prometheus (Debian's package) on the real dev server, against the SMTP catcher's ground
truth."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email, EmailStatus, RetrySettings
from postlane.metrics import ENQUEUE_TO_ACCEPTED_BUCKETS, SMTP_TRANSACTION_BUCKETS, Metric
from tests.procs import (
    REPO_ROOT,
    WorkerProcess,
    assert_eventually,
    free_port,
    postlane_env,
    wait_for_pollers,
    write_config,
)
from tests.prom import Prometheus, finite, http_get
from tests.test_integration import address_of, new_lane, send_in_data

pytestmark = pytest.mark.devserver

OUTAGE = "451 4.3.0 mailbox temporarily unavailable"
RETRY = RetrySettings(
    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=1), maximum_attempts=3
)


def email_from(lane: LaneConfig, subject: str, to: str = "bob@example.test") -> Email:
    return Email(sender=f"news@{lane.name}.test", to=[to], subject=subject, text="hello")


def lane_on(smtp: SmtpCatcher, **fields: Any) -> LaneConfig:
    lane = new_lane(smtp, retry=RETRY, **fields)
    return lane.model_copy(update={"senders": [f"*@{lane.name}.test"]})


def observed_env(dev_env: WorkflowEnvironment, config: Path, metrics: int, health: int = 0) -> Any:
    return postlane_env(
        address_of(dev_env),
        config,
        POSTLANE_METRICS_PORT=str(metrics),
        POSTLANE_METRICS_ADDRESS="127.0.0.1",
        POSTLANE_HEALTH_PORT=str(health),
    )


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def status_is(pl: PostlaneClient, key: str, status: EmailStatus) -> bool:
    return await pl.status(key) == status


@pytest.mark.timeout(240)
async def test_prometheus_reads_counts_failures_and_quantiles_from_a_real_worker(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """Two lanes send through a worker process; emails are sent, retried after transient
    failures, refused for good and dead-lettered. Prometheus, scraping the worker every
    second, reports exactly what the SMTP catchers saw, failures by kind, and finite P99s
    inside the histograms' ranges. Every send-path log line (JSON) names its email."""
    client = dev_env.client
    with SmtpCatcher() as smtp_a, SmtpCatcher() as smtp_b:
        a, b = lane_on(smtp_a), lane_on(smtp_b, hourly_cap=1000)
        pl = PostlaneClient(client, Settings(lanes=[a, b]))
        port = free_port()
        env = observed_env(dev_env, write_config(tmp_path / "postlane.toml", [a, b]), port)
        with (
            WorkerProcess.start(env, tmp_path, "--json-logs") as worker,
            Prometheus.start(tmp_path / "prom", {"w1": f"127.0.0.1:{port}"}) as prom,
        ):
            await wait_for_pollers(client, a.task_queue, [worker])
            await wait_for_pollers(client, b.task_queue, [worker])
            # Lane a: one email after two transient failures, then two more at once.
            smtp_a.fail("data", OUTAGE, times=2)
            await (await pl.send(email_from(a, "one"), key=f"{key}-a0")).result()
            for n in (1, 2):
                await pl.send(email_from(a, f"a{n}"), key=f"{key}-a{n}")
            # Lane b: one sent, one refused for good, one dead-lettered after 3 attempts.
            await (await pl.send(email_from(b, "b0"), key=f"{key}-b0")).result()
            smtp_b.reject_recipient("nobody@example.test")
            await pl.send(email_from(b, "b1", to="nobody@example.test"), key=f"{key}-b1")
            await assert_eventually(
                lambda: status_is(pl, f"{key}-b1", EmailStatus.FAILED), within=60, what="b1"
            )
            smtp_b.fail("data", OUTAGE, times=3)
            await pl.send(email_from(b, "b2"), key=f"{key}-b2")
            await assert_eventually(
                lambda: status_is(pl, f"{key}-b2", EmailStatus.DEAD_LETTER), within=90, what="b2"
            )
            await smtp_a.wait_for_async(3)
            # Lane a: a provider's "slow down", then the email goes out; the lane backs off.
            smtp_a.fail("mail", "450 4.7.1 slow down")
            await (await pl.send(email_from(a, "a3"), key=f"{key}-a3")).result()
            truth = {a.name: len(smtp_a.messages), b.name: len(smtp_b.messages)}
            assert truth == {a.name: 4, b.name: 1}

            async def sent_counts() -> bool:
                got = await prom.values(f"sum by (lane) ({Metric.EMAILS_SENT})", ["lane"])
                assert got == {(a.name,): 4.0, (b.name,): 1.0}, got
                return True

            await assert_eventually(sent_counts, within=60, what="emails sent at Prometheus")

            async def failure_counts() -> bool:
                got = await prom.values(
                    f"sum by (lane, kind) ({Metric.EMAIL_FAILURES})", ["lane", "kind"]
                )
                assert got == {
                    (a.name, "transient"): 2.0,
                    (a.name, "throttle"): 1.0,
                    (b.name, "permanent"): 1.0,
                    (b.name, "transient"): 3.0,
                    (b.name, "dead_lettered"): 1.0,
                }, got
                return True

            await assert_eventually(failure_counts, within=60, what="failures by kind")

            # Every transaction (sent or failed) is timed; only accepted emails wait.
            for metric, buckets, count in (
                (Metric.SMTP_TRANSACTION_SECONDS, SMTP_TRANSACTION_BUCKETS, (7, 5)),
                (Metric.ENQUEUE_TO_ACCEPTED_SECONDS, ENQUEUE_TO_ACCEPTED_BUCKETS, (4, 1)),
            ):
                counts = await prom.values(f"sum by (lane) ({metric}_count)", ["lane"])
                assert counts == {(a.name,): count[0], (b.name,): count[1]}, (metric, counts)
                p99 = await prom.values(
                    f"histogram_quantile(0.99, sum by (le, lane) ({metric}_bucket))", ["lane"]
                )
                assert set(p99) == {(a.name,), (b.name,)}, p99
                for value in p99.values():
                    assert finite(value) and 0 < value <= buckets[-1], (metric, p99)

            # Any worker on the shared server may run another test's lane workflow (one
            # woken by its timer) and publish that lane's gauges: read these two lanes'.
            ours = f'{{lane=~"{a.name}|{b.name}"}}'

            async def lane_gauges() -> bool:
                rates = await prom.values(
                    f"{Metric.LANE_RATE}{ours} / on (lane) {Metric.LANE_CONFIGURED_RATE}{ours}",
                    ["lane"],
                )
                assert rates == {(a.name,): 0.5, (b.name,): 1.0}, rates
                backing_off = await prom.values(f"{Metric.LANE_BACKING_OFF}{ours}", ["lane"])
                assert backing_off == {(a.name,): 1.0, (b.name,): 0.0}, backing_off
                caps = await prom.values(f"{Metric.LANE_CAP}{ours}", ["lane", "window"])
                assert caps == {(b.name, "hour"): 1000.0}, caps  # lane a has no cap
                used = await prom.values(f"{Metric.LANE_CAP_USED}{ours}", ["lane", "window"])
                assert used[(b.name, "hour")] == used[(b.name, "day")] == 3.0, used
                return True

            await assert_eventually(lane_gauges, within=30, what="lane gauges")
            status, scrape = await http_get(f"http://127.0.0.1:{port}/metrics")
            assert status == 200
            (tmp_path / "scrape.txt").write_text(scrape)
            assert "temporal_worker_task_slots_available" in scrape  # the SDK's own

        send_path = [
            line
            for line in map(_json_or_none, worker.stderr.splitlines())
            if line and line.get("event") in ("email.sent", "email.attempt_failed")
        ]
        assert len(send_path) == 4 + 2 + 1 + 1 + 1 + 3, send_path
        for line in send_path:
            for field in ("workflow_id", "run_id", "lane", "attempt", "message_id"):
                assert line.get(field), (field, line)
            assert line["workflow_id"].startswith(f"email:{key}-")


@pytest.mark.timeout(240)
async def test_a_replayed_email_is_not_counted_twice(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """An email dead-letters on one worker process, which stops; a second process replays
    its history when it is retried, and sends it. Prometheus's counts, over both
    processes, equal what the SMTP catcher received: the second process counts the send,
    not the dead letter again."""
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = lane_on(smtp)
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        config = write_config(tmp_path / "postlane.toml", [lane])
        ports = {"first": free_port(), "second": free_port()}
        targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        with Prometheus.start(tmp_path / "prom", targets) as prom:
            env = observed_env(dev_env, config, ports["first"])
            with WorkerProcess.start(env, tmp_path, name="first") as first:
                await wait_for_pollers(client, lane.task_queue, [first])
                await (await pl.send(email_from(lane, "ok"), key=f"{key}-ok")).result()
                smtp.fail("data", OUTAGE, times=3)
                await pl.send(email_from(lane, "parked"), key=f"{key}-parked")
                await assert_eventually(
                    lambda: status_is(pl, f"{key}-parked", EmailStatus.DEAD_LETTER),
                    within=90,
                    what="parked",
                )

                async def first_counted() -> bool:
                    got = await prom.values(
                        f"sum by (kind) ({Metric.EMAIL_FAILURES}{{worker='first'}})", ["kind"]
                    )
                    assert got == {("transient",): 3.0, ("dead_lettered",): 1.0}, got
                    return True

                await assert_eventually(first_counted, within=60, what="first's counts")
                first.send_signal(signal.SIGTERM)
                assert await first.wait() == 0, first.describe_exit()

            env = observed_env(dev_env, config, ports["second"])
            with WorkerProcess.start(env, tmp_path, name="second") as second:
                await wait_for_pollers(client, lane.task_queue, [second])
                assert await pl.retry(f"{key}-parked", reason="provider back") is True
                await smtp.wait_for_async(2)
                assert len(smtp.messages) == 2  # the ground truth
                await assert_eventually(
                    lambda: status_is(pl, f"{key}-parked", EmailStatus.SENT), what="sent"
                )

                async def second_counted() -> bool:
                    assert await prom.scraped("second")
                    sent = await prom.values(
                        f"sum by (worker) (max_over_time({Metric.EMAILS_SENT}[10m]))", ["worker"]
                    )
                    assert sent == {("first",): 1.0, ("second",): 1.0}, sent
                    failures = await prom.values(
                        f"sum by (kind) ({Metric.EMAIL_FAILURES}{{worker='second'}})", ["kind"]
                    )
                    assert failures == {}, failures  # the replayed dead letter is not counted
                    latency = await prom.values(
                        f"sum by (worker) (max_over_time("
                        f"{Metric.ENQUEUE_TO_ACCEPTED_SECONDS}_count[10m]))",
                        ["worker"],
                    )
                    assert latency == {("first",): 1.0, ("second",): 1.0}, latency
                    return True

                await assert_eventually(second_counted, within=60, what="second's counts")


BLOCKING_WORKER = """
import signal, sys, time
from postlane.cli.app import main

# SIGUSR1 blocks the main thread, the one the worker's event loop runs on: a stuck worker.
signal.signal(signal.SIGUSR1, lambda *_: time.sleep(float(sys.argv[1])))
sys.exit(main(["worker", *sys.argv[2:]]))
"""


def start_blocking_worker(env: Any, log_dir: Path, block_seconds: float) -> WorkerProcess:
    """``postlane worker`` in a process whose event loop SIGUSR1 blocks for a while."""
    out = (log_dir / "worker.out").open("wb")
    err = (log_dir / "worker.err").open("wb")
    with out, err:
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCKING_WORKER, str(block_seconds)],
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return WorkerProcess(proc, log_dir, "worker")


async def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, body = await http_get(f"http://127.0.0.1:{port}{path}")
    return status, json.loads(body)


@pytest.mark.timeout(240)
async def test_health_tells_a_busy_worker_from_a_stuck_one(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """A real worker process: ready once polling; still live and ready with every send slot
    in use (busy); not live when its event loop is blocked (stuck), and live again after;
    not ready, yet live, while it drains on SIGTERM."""
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = lane_on(smtp, max_concurrent=1)
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        metrics, health = free_port(), free_port()
        env = observed_env(
            dev_env, write_config(tmp_path / "postlane.toml", [lane]), metrics, health
        )
        with start_blocking_worker(env, tmp_path, block_seconds=20) as worker:
            await wait_for_pollers(client, lane.task_queue, [worker])

            async def answers(path: str, code: int, problem: str = "") -> dict[str, Any]:
                status, body = await probe(health, path)
                assert status == code, (path, status, body)
                assert problem in " ".join(body["problems"]), body
                return body

            await assert_eventually(lambda: answers("/readyz", 200), within=30, what="ready")
            await answers("/healthz", 200)

            # Busy: the lane's only slot holds a send the server is slow to answer.
            smtp.delay("data", 8)
            await pl.send(email_from(lane, "slow"), key=f"{key}-slow")
            await send_in_data(dev_env, f"email:{key}-slow")

            async def slots_full() -> bool:
                _, scrape = await http_get(f"http://127.0.0.1:{metrics}/metrics")
                return any(
                    line.startswith("temporal_worker_task_slots_available{")
                    and f'task_queue="{lane.task_queue}"' in line
                    and 'worker_type="ActivityWorker"' in line
                    and line.endswith(" 0")
                    for line in scrape.splitlines()
                )

            await assert_eventually(slots_full, within=30, what="every send slot in use")
            await answers("/healthz", 200)
            await answers("/readyz", 200)
            await smtp.wait_for_async(1, timeout=60)

            # Stuck: the event loop blocked (the endpoints answer from their own thread).
            worker.send_signal(signal.SIGUSR1)
            await assert_eventually(
                lambda: answers("/healthz", 503, "event loop blocked"), within=30, what="stuck"
            )
            await answers("/readyz", 503, "event loop blocked")
            await assert_eventually(lambda: answers("/healthz", 200), within=40, what="unstuck")

            # Draining: not ready, still live.
            smtp.delay("data", 8)
            await pl.send(email_from(lane, "last"), key=f"{key}-last")
            await send_in_data(dev_env, f"email:{key}-last")
            worker.send_signal(signal.SIGTERM)
            await assert_eventually(
                lambda: answers("/readyz", 503, "shutting down"), within=10, what="draining"
            )
            await answers("/healthz", 200)
            assert await worker.wait() == 0, worker.describe_exit()
        assert len(smtp.messages) == 2


@pytest.mark.timeout(180)
async def test_sequence_outcomes_per_campaign_reach_prometheus(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """Sequences that complete and that end on a reply are counted once each, per
    campaign and outcome."""
    from postlane.sequences.models import InboundEvent, InboundKind, SequenceStatus
    from postlane.sequences.spec import Recipient, spec_from_dict

    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = lane_on(smtp)
        pl = PostlaneClient(client, Settings(lanes=[lane]))
        port = free_port()
        env = observed_env(dev_env, write_config(tmp_path / "postlane.toml", [lane]), port)
        campaign = f"launch-{key}"

        def spec_waiting(timeout: str) -> Any:
            return spec_from_dict(
                {
                    "name": campaign,
                    "sender": f"ada@{lane.name}.test",
                    "templates": {"intro": {"subject": "Hello", "text": "Hi {{ first_name }}"}},
                    "steps": [
                        {"type": "send", "id": "intro", "template": "intro"},
                        {"type": "wait_for_reply", "id": "wait", "timeout": timeout},
                    ],
                }
            )

        spec, waits = spec_waiting("1s"), spec_waiting("1d")
        with (
            WorkerProcess.start(env, tmp_path) as worker,
            Prometheus.start(tmp_path / "prom", {"w1": f"127.0.0.1:{port}"}) as prom,
        ):
            await wait_for_pollers(client, lane.task_queue, [worker])
            done = [
                await pl.sequences.start(
                    spec, Recipient(address=f"p{n}@example.test"), key=f"{key}-{n}"
                )
                for n in range(2)
            ]
            for handle in done:
                assert (await handle.result()).status == SequenceStatus.COMPLETED
            await pl.sequences.start(waits, Recipient(address="r@example.test"), key=f"{key}-r")

            async def waiting() -> Any:
                r = await pl.sequences.status(f"{key}-r")
                return r if r.step == "wait" and r.sent else None

            report = await assert_eventually(waiting, within=60, what="waiting for a reply")
            await pl.sequences.record_reply(
                InboundEvent(
                    kind=InboundKind.REPLY,
                    message_id=f"<reply-{key}@example.test>",
                    refers_to=report.sent[-1].message_id,
                    from_address="r@example.test",
                    subject="Re: Hello",
                    text="yes",
                )
            )

            async def outcomes() -> bool:
                got = await prom.values(
                    f"sum by (campaign, outcome) ({Metric.SEQUENCE_OUTCOMES})",
                    ["campaign", "outcome"],
                )
                assert got == {(campaign, "completed"): 2.0, (campaign, "replied"): 1.0}, got
                return True

            await assert_eventually(outcomes, within=60, what="sequence outcomes")
        assert len(smtp.messages) == 3


def test_failure_kinds_cover_every_send_error() -> None:
    """Each error the send activity raises maps to its documented kind."""
    from postlane.errors import ErrorType
    from postlane.metrics import FailureKind, failure_kind

    # LanePaused is no failed attempt (nothing was tried): never counted as one.
    kinds = {t for t in ErrorType if t.startswith(("Smtp", "Lane", "Conf"))}
    assert {t: failure_kind(t) for t in kinds - {ErrorType.LANE_PAUSED}} == {
        ErrorType.SMTP_TRANSIENT: FailureKind.TRANSIENT,
        ErrorType.SMTP_THROTTLED: FailureKind.THROTTLE,
        ErrorType.SMTP_PERMANENT: FailureKind.PERMANENT,
        ErrorType.SMTPUTF8_UNSUPPORTED: FailureKind.PERMANENT,
        ErrorType.SMTP_TLS: FailureKind.CONFIGURATION,
        ErrorType.LANE_UNKNOWN: FailureKind.CONFIGURATION,
        ErrorType.CONFIGURATION: FailureKind.CONFIGURATION,
    }


async def test_a_taken_metrics_port_is_a_clear_error_before_connecting(tmp_path: Path) -> None:
    """The worker refuses to start, naming the setting, when its port is taken."""
    import socket

    from tests.procs import run_postlane

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Nothing listens on Temporal's address: the error comes before any connection.
        env = postlane_env(f"127.0.0.1:{free_port()}", tmp_path / "missing.toml")
        env.pop("POSTLANE_CONFIG")
        for flag, field in (("--metrics-port", "metrics_port"), ("--health-port", "health_port")):
            rc, _, err = await run_postlane(
                ["worker", flag, str(port), "--metrics-address", "127.0.0.1"], env
            )
            assert rc == 2, err
            assert f"error: ConfigurationError: {field}: cannot serve" in err, err
            assert "Address already in use" in err, err


@pytest.mark.timeout(180)
async def test_readiness_follows_the_temporal_connection(key: str, tmp_path: Path) -> None:
    """A worker whose Temporal server goes away stays live (its loop turns) but is not
    ready, saying why; it becomes ready again when the server is back on the same port."""
    from postlane import search_attributes as sa
    from postlane.connection import data_converter
    from postlane.dev.binaries import dev_server_path
    from tests.conftest import DEV_SERVER_ARGS

    port = free_port()

    async def server() -> WorkflowEnvironment:
        return await WorkflowEnvironment.start_local(
            port=port,
            dev_server_existing_path=dev_server_path(),
            data_converter=data_converter(),
            search_attributes=list(sa.ALL),
            dev_server_extra_args=DEV_SERVER_ARGS,
        )

    with SmtpCatcher() as smtp:
        lane = lane_on(smtp)
        health = free_port()
        temporal: WorkflowEnvironment | None = await server()
        assert temporal is not None
        try:
            env = observed_env(
                temporal, write_config(tmp_path / "postlane.toml", [lane]), free_port(), health
            )
            with WorkerProcess.start(env, tmp_path) as worker:
                await wait_for_pollers(temporal.client, lane.task_queue, [worker])

                async def answers(path: str, code: int, problem: str = "") -> bool:
                    status, body = await probe(health, path)
                    assert status == code, (path, status, body)
                    assert problem in " ".join(body["problems"]), body
                    return True

                await assert_eventually(lambda: answers("/readyz", 200), within=30, what="ready")
                down, temporal = temporal, None
                await down.shutdown()
                await assert_eventually(
                    lambda: answers("/readyz", 503, "Temporal not reachable"),
                    within=60,
                    what="not ready without Temporal",
                )
                await answers("/healthz", 200)
                assert worker.running
                temporal = await server()
                await assert_eventually(
                    lambda: answers("/readyz", 200), within=60, what="ready again"
                )
        finally:
            if temporal is not None:
                await temporal.shutdown()
