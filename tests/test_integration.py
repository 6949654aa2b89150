"""End to end on the real Temporal dev server, real worker processes and a real SMTP server.

Worker processes are started as operators start them (``python worker.py``), killed with
SIGKILL or stopped with SIGTERM, and the CLI runs as its console script. Waits poll what
Temporal or the SMTP catcher can observe (`assert_eventually`); no test asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.history.v1 import History
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from postlane.client import PostlaneClient
from postlane.config import LaneConfig, Settings
from postlane.dev.catcher import SmtpCatcher
from postlane.email.models import Email, EmailStatus, RetrySettings
from postlane.ids import WORKFLOW_TASK_QUEUE, lane_workflow_id
from postlane.lanes.limits import start_lane_workflow
from postlane.testing import catcher_lane, running_workers
from tests.procs import (
    RunningSend,
    WorkerProcess,
    assert_eventually,
    describe_lane_queue,
    history_identities,
    postlane_env,
    run_command,
    run_postlane,
    running_send,
    wait_for_pollers,
    write_config,
)
from workflows import WORKFLOWS

pytestmark = pytest.mark.devserver

SENDER = "agent@it.test"


def new_lane(smtp: SmtpCatcher | None = None, **fields: Any) -> LaneConfig:
    """A lane with a name of its own (its own task queue) serving ``*@it.test``."""
    lane = LaneConfig(
        **{
            "name": f"it-{uuid.uuid4().hex[:6]}",
            "senders": ["*@it.test"],
            "smtp_host": "127.0.0.1",
            "smtp_port": 25,
            "smtp_tls": "none",
            "rate_per_second": 50,
            "retry": RetrySettings(
                initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=5)
            ),
            **fields,
        }
    )
    return catcher_lane(lane, smtp) if smtp is not None else lane


def an_email(subject: str = "Your code", to: str = "bob@example.test", **fields: Any) -> Email:
    return Email(sender=SENDER, to=[to], subject=subject, text="847291", **fields)


def address_of(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


async def send_in_data(env: WorkflowEnvironment, workflow_id: str) -> RunningSend:
    """Wait until a worker's send attempt has heartbeated that it is in the DATA phase."""
    handle = env.client.get_workflow_handle(workflow_id)

    async def in_data() -> RunningSend | None:
        send = await running_send(env.client, handle)
        return send if send is not None and send.phase == "data" else None

    return await assert_eventually(in_data, within=45, what="a worker in the SMTP DATA phase")


async def lane_history(client: Client, lane: str) -> list[Any]:
    """The events of the lane's quota workflow (none while it does not exist yet)."""
    try:
        history = await client.get_workflow_handle(lane_workflow_id(lane)).fetch_history()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return []
        raise
    return list(history.events)


async def lane_settled(client: Client, lane: str, configures: int) -> bool:
    """Has the lane workflow handled its `configures`-th ``configure`` signal, with no
    workflow task and no activity (rate update) still to run?"""
    seen, handled, task_pending, scheduled, finished = 0, False, False, 0, 0
    for event in await lane_history(client, lane):
        if event.HasField("workflow_execution_signaled_event_attributes"):
            if event.workflow_execution_signaled_event_attributes.signal_name == "configure":
                seen, handled = seen + 1, False
        elif event.HasField("workflow_task_scheduled_event_attributes"):
            task_pending = True
        elif event.HasField("workflow_task_completed_event_attributes"):
            handled, task_pending = True, False
        elif event.HasField("activity_task_scheduled_event_attributes"):
            scheduled += 1
        elif event.HasField("activity_task_completed_event_attributes"):
            finished += 1
    return seen >= configures and handled and not task_pending and scheduled == finished


# -- 1. crash: SIGKILL mid-send --------------------------------------------------------------


async def test_worker_killed_mid_send_completes_on_other_worker(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        with (
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="a") as a,
            WorkerProcess.start(env, tmp_path, "--lanes", lane.name, name="b") as b,
        ):
            await wait_for_pollers(client, lane.task_queue, [a, b])
            smtp.delay("data", 10)  # only the first transaction is slow
            pl = PostlaneClient(client, Settings(lanes=[lane]))
            handle = await pl.send(an_email(), key=key)

            send = await send_in_data(dev_env, handle.workflow_id)
            assert send.attempt == 1
            victim, survivor = (a, b) if a.owns(send.worker_identity) else (b, a)
            assert victim.owns(send.worker_identity), send.worker_identity
            victim.kill()
            assert await victim.wait() == -signal.SIGKILL

            receipt = await asyncio.wait_for(handle.result(), 90)
            assert survivor.running, survivor.describe_exit()
            events = await history_identities(client.get_workflow_handle(handle.workflow_id))

    assert receipt.accepted == ["bob@example.test"]
    assert receipt.attempts >= 2
    # The killed attempt's DATA may or may not have been accepted after the kill; every
    # copy that arrived is the same message (one Message-ID, which receivers dedupe on).
    caught = smtp.messages
    assert caught, "nothing was delivered"
    assert {m.message_id for m in caught} == {receipt.message_id}
    completed = [identity for kind, identity in events if kind == "activity_task_completed"]
    assert len(completed) == 1 and survivor.owns(completed[0]), events


# -- 2. lane limits land on the server -------------------------------------------------------


async def test_worker_applies_lane_rate_on_server(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client = dev_env.client
    lane = new_lane(rate_per_second=7, per_domain_per_second=2)
    env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
    request = DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=f"postlane.lane.{lane.name}"),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
        report_config=True,
    )
    with WorkerProcess.start(env, tmp_path, "--lanes", lane.name) as worker:

        async def configured() -> Any:
            assert worker.running, worker.describe_exit()
            response = await client.workflow_service.describe_task_queue(request)
            config = response.config
            if (
                config.queue_rate_limit.rate_limit.requests_per_second == 7
                and config.fairness_keys_rate_limit_default.rate_limit.requests_per_second == 2
            ):
                return response
            return None

        response = await assert_eventually(configured, within=60, what="lane limits on the server")

    assert response.effective_rate_limit.requests_per_second == pytest.approx(7)
    assert lane.name in response.config.queue_rate_limit.metadata.reason


# -- 2b. edited lane limits reach the server -----------------------------------------------


@pytest.mark.parametrize(
    ("rate", "per_domain"),
    [
        pytest.param(9, 3, id="rate-and-per-domain"),
        pytest.param(7, 3, id="per-domain-only"),
        pytest.param(9, None, id="per-domain-removed"),
    ],
)
async def test_restarted_worker_applies_edited_lane_limits(
    dev_env: WorkflowEnvironment, tmp_path: Path, rate: float, per_domain: float | None
) -> None:
    client = dev_env.client
    before = new_lane(rate_per_second=7, per_domain_per_second=2)
    after = before.model_copy(update={"rate_per_second": rate, "per_domain_per_second": per_domain})
    config = tmp_path / "postlane.toml"
    env = postlane_env(address_of(dev_env), config)

    write_config(config, [before])
    with WorkerProcess.start(env, tmp_path, "--lanes", before.name, name="first") as worker:
        await assert_eventually(lambda: lane_settled(client, before.name, 1), what="lane set up")
        worker.send_signal(signal.SIGTERM)
        await worker.wait()
    response = await describe_lane_queue(client, before)
    assert response.config.fairness_keys_rate_limit_default.rate_limit.requests_per_second == 2

    write_config(config, [after])  # the operator edits postlane.toml and restarts
    with WorkerProcess.start(env, tmp_path, "--lanes", after.name, name="second"):
        await assert_eventually(lambda: lane_settled(client, after.name, 2), what="reconfigured")
        response = await describe_lane_queue(client, after)

    assert response.config.queue_rate_limit.rate_limit.requests_per_second == pytest.approx(rate)
    fairness = response.config.fairness_keys_rate_limit_default
    if per_domain is None:
        assert not fairness.HasField("rate_limit"), fairness
    else:
        assert fairness.rate_limit.requests_per_second == pytest.approx(per_domain)


async def test_lane_edit_during_rate_update_reaches_server(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client = dev_env.client
    before = new_lane(rate_per_second=7)
    after = before.model_copy(update={"rate_per_second": 9})

    async def update_scheduled() -> bool:
        return any(
            e.activity_task_scheduled_event_attributes.activity_type.name == "set_lane_rate"
            for e in await lane_history(client, before.name)
            if e.HasField("activity_task_scheduled_event_attributes")
        )

    # A host starts the lane; only orchestration runs for now, so its rate update (7/s)
    # is scheduled but not yet carried out.
    async with Worker(client, task_queue=WORKFLOW_TASK_QUEUE, workflows=WORKFLOWS):
        await start_lane_workflow(client, before)
        await assert_eventually(update_scheduled, what="set_lane_rate scheduled")

    # The operator edits postlane.toml (9/s) and starts a full worker.
    env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [after]))
    with WorkerProcess.start(env, tmp_path, "--lanes", after.name):
        await assert_eventually(lambda: lane_settled(client, after.name, 2), what="reconfigured")
        response = await describe_lane_queue(client, after)

    assert response.config.queue_rate_limit.rate_limit.requests_per_second == pytest.approx(9)


# -- 3. graceful stop: SIGTERM drains --------------------------------------------------------


async def test_worker_sigterm_drains_in_flight_send(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        # Workflows run in this process (sending only for a lane of their own that nobody
        # sends to), so the workflow can finish after the lane worker process has gone.
        idle = new_lane()
        async with running_workers(dev_env, Settings(lanes=[idle, lane]), lanes=[idle.name]):
            with WorkerProcess.start(
                env, tmp_path, "--lanes", lane.name, "--no-workflows"
            ) as worker:
                await wait_for_pollers(client, lane.task_queue, [worker])
                smtp.delay("data", 8)
                pl = PostlaneClient(client, Settings(lanes=[lane]))
                handle = await pl.send(an_email(), key=key)

                send = await send_in_data(dev_env, handle.workflow_id)
                assert worker.owns(send.worker_identity)
                worker.send_signal(signal.SIGTERM)
                assert await worker.wait(60) == 0, worker.describe_exit()

                receipt = await asyncio.wait_for(handle.result(), 60)
                events = await history_identities(client.get_workflow_handle(handle.workflow_id))

    assert receipt.attempts == 1  # finished by the draining worker, not retried elsewhere
    assert [m.message_id for m in smtp.messages] == [receipt.message_id]
    completed = [identity for kind, identity in events if kind == "activity_task_completed"]
    assert len(completed) == 1 and worker.owns(completed[0]), events
    assert "worker.stopped" in worker.stderr


# -- 4. a bad config file stops the worker with file:line:field ------------------------------

_BAD_RATE = """\
[[lanes]]
name = "first"
senders = ["*"]
smtp_host = "127.0.0.1"

[[lanes]]
name = "second"
senders = ["*@second.test"]
smtp_host = "127.0.0.1"
rate_per_second = -1
"""

_BAD_SYNTAX = """\
[[lanes]]
name = "first"
smtp_host "127.0.0.1"
"""


async def test_malformed_config_stops_worker_with_file_line_field(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    worker = [sys.executable, "worker.py"]

    config = tmp_path / "bad-rate.toml"
    config.write_text(_BAD_RATE)
    rc, _out, err = await run_command(worker, postlane_env(address_of(dev_env), config), within=60)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ConfigurationError: ")
    assert f"{config}:10:" in lines[0]
    assert "lanes.1.rate_per_second" in lines[0]

    config = tmp_path / "bad-syntax.toml"
    config.write_text(_BAD_SYNTAX)
    rc, _out, err = await run_command(worker, postlane_env(address_of(dev_env), config), within=60)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ConfigurationError: ")
    assert str(config) in lines[0]
    assert "line 3" in lines[0]


# -- 5. credentials stay in the worker -------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_no_credentials_in_history_or_logs(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    client = dev_env.client
    tag = uuid.uuid4().hex[:8]
    user_var, pass_var = f"IT_SMTP_USER_{tag}", f"IT_SMTP_PASS_{tag}"
    username, secret = f"login-{uuid.uuid4().hex}", f"s3cret-{uuid.uuid4().hex}"
    with SmtpCatcher(logins={username: secret}) as smtp:
        lane = new_lane(smtp_port=smtp.port, smtp_username_env=user_var, smtp_password_env=pass_var)
        config = write_config(tmp_path / "postlane.toml", [lane])
        env = postlane_env(address_of(dev_env), config, **{user_var: username, pass_var: secret})
        with WorkerProcess.start(env, tmp_path, "--lanes", lane.name) as worker:
            await wait_for_pollers(client, lane.task_queue, [worker])
            # One failed attempt first, so a failure (and its retry) is in history and logs.
            smtp.fail("mail", "451 4.3.0 mailbox busy")
            pl = PostlaneClient(client, Settings(lanes=[lane]))
            subject = f"Credentials check {tag}"
            handle = await pl.send(an_email(subject), key=key)
            receipt = await asyncio.wait_for(handle.result(), 60)
            history = await client.get_workflow_handle(handle.workflow_id).fetch_history()
            worker.send_signal(signal.SIGTERM)
            await worker.wait(60)  # its logs are complete once it is gone

    assert receipt.attempts == 2
    assert [m.login for m in smtp.messages] == [username]  # delivered over an AUTHed session
    # Payloads are base64 in the JSON form, so also search the raw protobuf bytes, where
    # payload data is the plain JSON the pydantic converter wrote (as the subject shows).
    raw = History(events=history.events).SerializeToString()
    assert subject.encode() in raw
    as_json = history.to_json()
    logs = worker.stdout + worker.stderr
    assert "worker.started" in logs
    for value in (secret, username):
        assert value.encode() not in raw
        assert value not in as_json
        assert value not in logs
        assert all(value.encode() not in m.raw for m in smtp.messages)


# -- 6. operators can find emails ------------------------------------------------------------


async def test_search_attributes_and_summary_visible(
    dev_env: WorkflowEnvironment, key: str
) -> None:
    client = dev_env.client
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        settings = Settings(lanes=[lane])
        async with running_workers(dev_env, settings):
            pl = PostlaneClient(client, settings)
            handle = await pl.send(
                an_email("Your code", to="carol@Example.test", tags=["otp"]), key=key
            )
            await asyncio.wait_for(handle.result(), 60)

    async def listed(query: str) -> list[str]:
        return [wf.id async for wf in client.list_workflows(query)]

    query = f'PostlaneStatus="sent" AND PostlaneLane="{lane.name}"'
    ids = await assert_eventually(lambda: listed(query), what=query)
    assert ids == [handle.workflow_id]
    query = (
        f'PostlaneLane="{lane.name}" AND PostlaneRecipientDomain="example.test"'
        ' AND PostlaneTag="otp"'
    )
    assert await assert_eventually(lambda: listed(query), what=query) == [handle.workflow_id]

    description = await client.get_workflow_handle(handle.workflow_id).describe()
    assert await description.static_summary() == "Your code → carol@Example.test"
    assert await pl.status(key) == EmailStatus.SENT


# -- 7. the CLI ------------------------------------------------------------------------------


async def test_cli_send_wait_and_status(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    with SmtpCatcher() as smtp:
        lane = new_lane(smtp)
        env = postlane_env(address_of(dev_env), write_config(tmp_path / "postlane.toml", [lane]))
        async with running_workers(dev_env, Settings(lanes=[lane])):
            rc, out, err = await run_postlane(
                [
                    "send",
                    "--from",
                    SENDER,
                    "--to",
                    "dave@example.test",
                    "--subject",
                    "CLI hello",
                    "--text",
                    "sent from the command line",
                    "--key",
                    key,
                    "--wait",
                ],
                env,
            )
            assert rc == 0, err
            first, _, rest = out.partition("\n")
            assert f"workflow_id=email:{key}" in first
            receipt = json.loads(rest)
            assert [m.message_id for m in smtp.messages] == [receipt["message_id"]]
            assert receipt["message_id"] in out
            assert receipt["accepted"] == ["dave@example.test"]

            rc, out, err = await run_postlane(["status", key], env)
            assert rc == 0, err
            assert json.loads(out)["status"] == "sent"

            rc, out, err = await run_postlane(
                [
                    "send",
                    "--from",
                    SENDER,
                    "--to",
                    "not-an-address",
                    "--subject",
                    "x",
                    "--text",
                    "y",
                ],
                env,
            )
            assert rc == 2
            assert out == ""
            assert len(err.splitlines()) == 1, err
            assert err.startswith("error: InvalidEmail: to")

            rc, out, err = await run_postlane(["status", f"missing-{key}"], env)
            assert rc == 1
            assert len(err.splitlines()) == 1, err
            assert err.startswith("error: EmailNotFound: ")
    assert len(smtp.messages) == 1
