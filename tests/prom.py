"""A real Prometheus (Debian's ``prometheus`` package) for tests, and plain HTTP helpers."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests import sysdeps
from tests.procs import free_port


async def http_get(url: str, wait: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET, off the event loop; an HTTP error status is returned too."""

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=wait) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    return await asyncio.to_thread(get)


@dataclass
class Prometheus:
    """A ``prometheus`` server scraping `targets` every second, with storage in a tmp dir."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @classmethod
    def start(cls, tmp: Path, targets: Mapping[str, str]) -> Prometheus:
        """Start it; `targets` maps an instance name to its ``host:port``."""
        binary = sysdeps.require("prometheus", "prometheus")
        tmp.mkdir(parents=True, exist_ok=True)
        static = [
            {"targets": [address], "labels": {"worker": name}} for name, address in targets.items()
        ]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "postlane", "static_configs": static}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        log = tmp / "prometheus.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(proc, f"http://127.0.0.1:{port}", log)

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector `promql` evaluates to now (``/api/v1/query``)."""
        assert self.proc.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
        status, body = await http_get(
            f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        )
        assert status == 200, f"{promql}: HTTP {status}: {body[:500]}"
        data = json.loads(body)
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    async def values(self, promql: str, by: Sequence[str]) -> dict[tuple[str, ...], float]:
        """`promql`'s samples keyed by the values of the labels `by`."""
        return {
            tuple(r["metric"].get(label, "") for label in by): float(r["value"][1])
            for r in await self.query(promql)
        }

    async def scraped(self, worker: str) -> bool:
        """Has Prometheus scraped `worker` successfully (``up == 1``)?"""
        up = await self.values(f'up{{worker="{worker}"}}', ["worker"])
        return up.get((worker,)) == 1.0

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def finite(value: float) -> bool:
    """Not NaN and not infinite."""
    return not (math.isnan(value) or math.isinf(value))
