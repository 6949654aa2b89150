"""The example Kubernetes deployment in deploy/k8s/: built-in kinds pass Kubernetes's own
schemas (kubernetes-validate ships them, so this runs offline); KEDA's ScaledObject and the
Kustomization, whose schemas are not available offline, are checked for what Postlane
relies on. Nothing here applies them to a cluster (docs/deploying.md says so)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from postlane.config import load_settings
from postlane.exporter import DEFAULT_PORT

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
NOT_BUILT_IN = {"ScaledObject", "Kustomization"}


def documents() -> dict[str, list[dict[str, Any]]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d]
        for p in sorted(K8S.glob("*.yaml"))
    }


def by_kind(kind: str, name: str) -> dict[str, Any]:
    found = [
        d
        for docs in documents().values()
        for d in docs
        if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_built_in_kinds_pass_the_kubernetes_schemas() -> None:
    files = [
        str(K8S / name)
        for name, docs in documents().items()
        if all(d["kind"] not in NOT_BUILT_IN for d in docs)
    ]
    assert len(files) >= 4
    result = subprocess.run(
        [str(VALIDATE), "--strict", "--kubernetes-version", "1.30", *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout + result.stderr  # every document had a schema


def test_kustomization_lists_every_manifest() -> None:
    kustomization = documents()["kustomization.yaml"][0]
    listed = set(kustomization["resources"])
    assert listed == set(documents()) - {"kustomization.yaml"}


def test_worker_probes_and_metrics_port() -> None:
    pod = by_kind("Deployment", "postlane-worker")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port, health = int(env["POSTLANE_METRICS_PORT"]), int(env["POSTLANE_HEALTH_PORT"])
    assert container["ports"] == [
        {"name": "metrics", "containerPort": port},
        {"name": "health", "containerPort": health},
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    # Longer than the worker's 30 s for in-flight sends to finish on SIGTERM.
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30


def test_exporter_runs_once_with_probes() -> None:
    deployment = by_kind("Deployment", "postlane-exporter")
    assert deployment["spec"]["replicas"] == 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["postlane"]
    assert container["args"][:3] == ["exporter", "--port", str(DEFAULT_PORT)]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    service = by_kind("Service", "postlane-exporter")
    assert service["spec"]["ports"][0]["port"] == DEFAULT_PORT


def test_scaled_object_scales_the_worker_on_every_lane_backlog(tmp_path: Path) -> None:
    scaled = by_kind("ScaledObject", "postlane-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "postlane-worker"
    assert spec["minReplicaCount"] >= 1  # some worker must run the workflows
    env = by_kind("ConfigMap", "postlane-env")["data"]
    toml = tmp_path / "postlane.toml"
    toml.write_text(by_kind("ConfigMap", "postlane-config")["data"]["postlane.toml"])
    lanes = load_settings(toml).lanes
    triggers = {t["metadata"]["taskQueue"]: t for t in spec["triggers"]}
    assert set(triggers) == {lane.task_queue for lane in lanes} | {"postlane"}
    # The parameters of KEDA's temporal scaler (keda.sh docs, v2.17+).
    known = {
        "endpoint",
        "endpointFromEnv",
        "namespace",
        "taskQueue",
        "queueTypes",
        "targetQueueSize",
        "activationTargetQueueSize",
        "workerDeploymentName",
        "workerDeploymentBuildId",
        "minConnectTimeout",
        "unsafeSsl",
        "tlsServerName",
        "enableTLS",
    }
    for queue, trigger in triggers.items():
        meta = trigger["metadata"]
        assert trigger["type"] == "temporal"
        assert set(meta) <= known, queue
        assert meta["endpoint"] == env["TEMPORAL_ADDRESS"]
        assert meta["namespace"] == env["TEMPORAL_NAMESPACE"]
        assert meta["queueTypes"] == ("workflow" if queue == "postlane" else "activity")
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata are strings"
        assert int(meta["targetQueueSize"]) > 0
