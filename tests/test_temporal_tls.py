"""Connecting to Temporal over TLS: a client certificate (mTLS) or an API key.

The dev server has no TLS of its own, so `tests.tls_proxy` puts Debian's nginx in front of
it, requiring a client certificate from a CA made here (or an API key on its second
listener). The worker, the CLI and the exporter are started as operators start them, with
nothing but the ``TEMPORAL_*`` variables telling them how to connect; an email goes out
through the proxy to the SMTP catcher. The proxy's log says which process (by its
certificate's name) made which call, which pins the permissions docs/security.md lists.
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from postlane.config import LaneConfig
from postlane.dev.catcher import SmtpCatcher
from postlane.ids import email_workflow_id
from postlane.testing import catcher_lane
from tests.procs import (
    POSTLANE_SCRIPT,
    REPO_ROOT,
    WorkerProcess,
    assert_eventually,
    free_port,
    postlane_env,
    run_postlane,
    wait_for_pollers,
    write_config,
)
from tests.tls_proxy import ClientFiles, plain_tls_tunnel, tls_proxy

pytestmark = pytest.mark.devserver

SENDER = "agent@tls.test"

# The Temporal calls each process may make: docs/security.md's "Permissions" lists the same
# (Read: only read-only calls; Write: any call on the namespace). The test checks that each
# process, as the proxy saw it, made no other call.
READ_ONLY_CALLS = {
    "GetSystemInfo",
    "DescribeNamespace",
    "DescribeTaskQueue",
    "CountWorkflowExecutions",
    "ListWorkflowExecutions",
    "DescribeWorkflowExecution",
    "GetWorkflowExecutionHistory",
    "GetWorkflowExecutionHistoryReverse",
    "QueryWorkflow",
}
MAY_CALL = {
    "app": READ_ONLY_CALLS
    | {
        "StartWorkflowExecution",
        "SignalWithStartWorkflowExecution",
        "SignalWorkflowExecution",
        "UpdateWorkflowExecution",
        "PollWorkflowExecutionUpdate",
        "RequestCancelWorkflowExecution",
    },
    "worker": READ_ONLY_CALLS
    | {
        "PollWorkflowTaskQueue",
        "PollActivityTaskQueue",
        "RespondWorkflowTaskCompleted",
        "RespondWorkflowTaskFailed",
        "RespondQueryTaskCompleted",
        "RespondActivityTaskCompleted",
        "RespondActivityTaskFailed",
        "RespondActivityTaskCanceled",
        "RecordActivityTaskHeartbeat",
        "RecordWorkerHeartbeat",
        "ShutdownWorker",
        "StartWorkflowExecution",
        "SignalWithStartWorkflowExecution",
        "SignalWorkflowExecution",
        "UpdateTaskQueueConfig",
    },
    "operator": READ_ONLY_CALLS
    | {
        "RequestCancelWorkflowExecution",
        "SignalWorkflowExecution",
        "UpdateWorkflowExecution",
        "PollWorkflowExecutionUpdate",
        "ResetWorkflowExecution",
        "UpdateTaskQueueConfig",
    },
    "exporter": READ_ONLY_CALLS,
}
SEEN_IN_EVERY_RUN = {
    "app": {"StartWorkflowExecution", "GetWorkflowExecutionHistory"},
    "worker": {"PollActivityTaskQueue", "PollWorkflowTaskQueue", "UpdateTaskQueueConfig"},
    "operator": {"DescribeWorkflowExecution", "RequestCancelWorkflowExecution"},
    "exporter": {"DescribeTaskQueue", "CountWorkflowExecutions"},
}


def new_lane(smtp: SmtpCatcher | None = None) -> LaneConfig:
    lane = LaneConfig(
        name=f"tls-{uuid.uuid4().hex[:6]}",
        senders=["*@tls.test"],
        smtp_host="127.0.0.1",
        smtp_tls="none",
        rate_per_second=50,
    )
    return lane if smtp is None else catcher_lane(lane, smtp)


def address_of(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


def tls_env(
    address: str,
    config: Path,
    *,
    ca: Path | None,
    client: ClientFiles | None = None,
    **extra: str,
) -> dict[str, str]:
    """A Postlane process's environment: Temporal behind the proxy, logs at their most
    verbose (so a secret would show if anything logged it)."""
    env = postlane_env(address, config, POSTLANE_LOG_LEVEL="DEBUG", **extra)
    env["TEMPORAL_TLS"] = "true"
    if ca is not None:
        env["TEMPORAL_TLS_SERVER_CA_CERT_PATH"] = str(ca)
    if client is not None:
        env["TEMPORAL_TLS_CLIENT_CERT_PATH"] = str(client.cert)
        env["TEMPORAL_TLS_CLIENT_KEY_PATH"] = str(client.key)
    return env


def send_args(key: str, subject: str, *, wait: bool = True) -> list[str]:
    args = ["send", "--from", SENDER, "--to", "bob@example.test", "--subject", subject]
    args += ["--text", "847291", "--key", key]
    return [*args, "--wait"] if wait else args


def key_material(files: ClientFiles) -> list[str]:
    """The lines of a private key's PEM body: none may appear in a log."""
    return [
        line for line in files.key.read_text().splitlines() if line and not line.startswith("-")
    ]


def assert_no_secret(texts: list[str], secrets: list[str]) -> None:
    joined = "\n".join(texts)
    assert "PRIVATE KEY" not in joined
    for secret in secrets:
        assert secret not in joined, "a secret reached a log"


async def assert_not_started(env: WorkflowEnvironment, key: str) -> None:
    with pytest.raises(RPCError) as err:
        await env.client.get_workflow_handle(email_workflow_id(key)).describe()
    assert err.value.status == RPCStatusCode.NOT_FOUND


def start_exporter(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """``postlane exporter`` on `port`, asking every second, its output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(POSTLANE_SCRIPT), "exporter", "--host", "127.0.0.1", "--port", str(port)]
            + ["--interval", "1"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


async def scrape(port: int) -> str:
    def get() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    return await asyncio.to_thread(get)


async def test_worker_cli_and_exporter_send_over_mtls(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    async with tls_proxy(tmp_path / "proxy", address_of(dev_env)) as proxy:
        with SmtpCatcher() as smtp:
            lane = new_lane(smtp)
            config = write_config(tmp_path / "postlane.toml", [lane])
            certs = {role: proxy.client_cert(role) for role in MAY_CALL}

            def env_for(role: str) -> dict[str, str]:
                return tls_env(proxy.mtls_address, config, ca=proxy.ca_file, client=certs[role])

            logs: list[str] = []
            with WorkerProcess.start(
                env_for("worker"), tmp_path, "--lanes", lane.name, name="worker"
            ) as worker:
                await wait_for_pollers(dev_env.client, lane.task_queue, [worker])
                subject = f"Over mTLS {uuid.uuid4().hex[:8]}"
                rc, out, err = await run_postlane(send_args(key, subject), env_for("app"))
                logs += [out, err]
                assert rc == 0, err

                # What the SMTP server received, and the server's own record of it.
                [caught] = await smtp.wait_for_async(1)
                assert caught.recipients == ["bob@example.test"]
                assert f"Subject: {subject}".encode() in caught.raw
                assert b"847291" in caught.raw
                desc = await dev_env.client.get_workflow_handle(email_workflow_id(key)).describe()
                assert desc.status == WorkflowExecutionStatus.COMPLETED

                # An operator's commands, over the same kind of connection.
                rc, out, err = await run_postlane(["status", key], env_for("operator"))
                logs += [out, err]
                assert rc == 0, err
                assert '"status": "sent"' in out
                later = f"{key}-later"
                rc, out, err = await run_postlane(
                    [*send_args(later, "Later", wait=False), "--send-at", "2099-01-01T00:00Z"],
                    env_for("app"),
                )
                logs += [out, err]
                assert rc == 0, err
                rc, out, err = await run_postlane(["cancel", later], env_for("operator"))
                logs += [out, err]
                assert rc == 0, err
                rc, out, err = await run_postlane(
                    ["dlq", "list", "--lane", lane.name], env_for("operator")
                )
                logs += [out, err]
                assert rc == 0, err

                # The exporter asks the server about the lane through the proxy too.
                port = free_port()
                exporter_log = tmp_path / "exporter.log"
                exporter = start_exporter(env_for("exporter"), port, exporter_log)
                try:
                    pollers = f'postlane_lane_pollers{{lane="{lane.name}"}} 1'

                    async def collected() -> bool:
                        assert exporter.poll() is None, exporter_log.read_text()
                        text = await scrape(port)
                        return "postlane_exporter_collect_success 1" in text and pollers in text

                    await assert_eventually(collected, within=60, what="exporter over mTLS")
                finally:
                    exporter.terminate()
                    await asyncio.to_thread(exporter.wait, 30)
                logs.append(exporter_log.read_text())
            logs += [worker.stdout, worker.stderr]

        # Every process went through the proxy, each with its own certificate, and made
        # only the calls its documented permissions allow.
        for role in certs:
            seen = proxy.methods_of(role)
            assert SEEN_IN_EVERY_RUN[role] <= seen, (role, seen)
            assert seen <= MAY_CALL[role], (role, seen - MAY_CALL[role])
        assert proxy.refused() == []
        assert_no_secret(logs, [line for c in certs.values() for line in key_material(c)])


async def test_api_key_over_tls(dev_env: WorkflowEnvironment, key: str, tmp_path: Path) -> None:
    async with tls_proxy(tmp_path / "proxy", address_of(dev_env)) as proxy:
        with SmtpCatcher() as smtp:
            lane = new_lane(smtp)
            config = write_config(tmp_path / "postlane.toml", [lane])
            env = tls_env(
                proxy.api_key_address, config, ca=proxy.ca_file, TEMPORAL_API_KEY=proxy.api_key
            )
            del env["TEMPORAL_TLS"]  # an API key switches TLS on by itself
            logs: list[str] = []
            with WorkerProcess.start(env, tmp_path, "--lanes", lane.name) as worker:
                await wait_for_pollers(dev_env.client, lane.task_queue, [worker])
                subject = f"With an API key {uuid.uuid4().hex[:8]}"
                rc, out, err = await run_postlane(send_args(key, subject), env)
                logs += [out, err]
                assert rc == 0, err
                [caught] = await smtp.wait_for_async(1)
                assert f"Subject: {subject}".encode() in caught.raw

                # A wrong key is refused, and nothing is started.
                wrong = f"pl-test-{uuid.uuid4().hex}"
                refused = f"{key}-refused"
                rc, out, err = await run_postlane(
                    send_args(refused, "never", wait=False), {**env, "TEMPORAL_API_KEY": wrong}
                )
                logs += [out, err]
                assert rc != 0
                assert "API key required" in err
                assert "TEMPORAL_API_KEY" in err
                await assert_not_started(dev_env, refused)
            logs += [worker.stdout, worker.stderr]
        assert proxy.refused(), "the proxy never saw the wrong key"
        assert_no_secret(logs, [proxy.api_key, wrong])


async def test_client_without_certificate_is_refused(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    async with tls_proxy(tmp_path / "proxy", address_of(dev_env)) as proxy:
        config = write_config(tmp_path / "postlane.toml", [new_lane()])
        env = tls_env(proxy.mtls_address, config, ca=proxy.ca_file)
        rc, out, err = await run_postlane(send_args(key, "never", wait=False), env)
        assert rc != 0
        assert "client certificate required" in err
        assert "TEMPORAL_TLS_CLIENT_CERT_PATH" in err  # names what to set
        assert "Traceback" not in err
        await assert_not_started(dev_env, key)

        # A worker without one stops at start, saying what to set.
        with WorkerProcess.start(env, tmp_path, name="worker") as worker:
            assert await worker.wait() != 0
        assert "client certificate required" in worker.stderr
        assert "TEMPORAL_TLS_CLIENT_CERT_PATH" in worker.stderr
        assert proxy.calls() == []
        assert proxy.refused()


async def test_client_that_does_not_trust_the_server_is_refused(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    async with tls_proxy(tmp_path / "proxy", address_of(dev_env)) as proxy:
        config = write_config(tmp_path / "postlane.toml", [new_lane()])
        client = proxy.client_cert("stranger")
        env = tls_env(proxy.mtls_address, config, ca=None, client=client)  # system CAs only
        rc, out, err = await run_postlane(send_args(key, "never", wait=False), env)
        assert rc != 0
        assert "UnknownIssuer" in err
        assert "TEMPORAL_TLS_SERVER_CA_CERT_PATH" in err
        await assert_not_started(dev_env, key)

        # Trusting the CA, but expecting another name than the certificate's.
        env = tls_env(proxy.mtls_address, config, ca=proxy.ca_file, client=client)
        env["TEMPORAL_TLS_SERVER_NAME"] = "temporal.elsewhere.test"
        rc, out2, err2 = await run_postlane(send_args(key, "never", wait=False), env)
        assert rc != 0
        assert "NotValidForName" in err2
        assert "TEMPORAL_TLS_SERVER_NAME" in err2
        await assert_not_started(dev_env, key)
        assert proxy.calls() == []
        assert_no_secret([out, err, out2, err2], key_material(client))


async def test_plain_tls_tunnel_is_refused_for_want_of_http2(
    dev_env: WorkflowEnvironment, key: str, tmp_path: Path
) -> None:
    """Why the proxy is nginx: a TLS-only tunnel (stunnel) offers no HTTP/2 by ALPN, and
    Temporal's client will not speak gRPC over it. The error says so."""
    async with plain_tls_tunnel(tmp_path / "tunnel", address_of(dev_env)) as tunnel:
        config = write_config(tmp_path / "postlane.toml", [new_lane()])
        env = tls_env(tunnel.mtls_address, config, ca=tunnel.ca_file)
        rc, out, err = await run_postlane(send_args(key, "never", wait=False), env)
        assert rc != 0
        assert "H2NotNegotiated" in err
        assert "HTTP/2 by ALPN" in err
        await assert_not_started(dev_env, key)
