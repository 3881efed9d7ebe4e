"""Real nats-server processes for the JetStream tests: one node, or a 3-node cluster, on
loopback with ephemeral ports and store directories under the test's tmp path.

``NatsCluster(tmp_path, nodes=3).start()`` starts the nodes, waits until JetStream has a meta
leader (so a stream can be created), and ``stop()`` ends them; ``kill(i)`` is ``kill -9``,
``restart(i)`` brings a node back on its old ports and store.  ``leader(stream)`` asks the
monitoring endpoint which node leads a stream (for "kill the leader").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def require_nats() -> None:
    if not os.access(NATS_SERVER, os.X_OK):
        pytest.skip("machine lacks nats-server (scripts/setup.sh installs it)")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """``nodes`` nats-server processes with JetStream; a cluster when ``nodes`` > 1."""

    def __init__(self, workdir: Path, nodes: int = 1, *, max_payload: int | None = None) -> None:
        self.workdir = workdir
        self.n = nodes
        ports = _free_ports(3 * nodes)
        self.client_ports = ports[:nodes]
        self.cluster_ports = ports[nodes : 2 * nodes]
        self.http_ports = ports[2 * nodes :]
        self.max_payload = max_payload
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes
        self._logs: list[Any] = [None] * nodes

    def url(self, i: int = 0, subject: str = "") -> str:
        return f"nats://127.0.0.1:{self.client_ports[i]}" + (f"/{subject}" if subject else "")

    def _config(self, i: int) -> Path:
        store = self.workdir / f"nats{i}" / "store"
        store.mkdir(parents=True, exist_ok=True)
        lines = [
            f"server_name: n{i}",
            f"listen: 127.0.0.1:{self.client_ports[i]}",
            f"http: 127.0.0.1:{self.http_ports[i]}",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 4GB",
            "}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.n > 1:
            routes = ", ".join(
                f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i
            )
            lines += [
                "cluster {",
                "  name: btc",
                f"  listen: 127.0.0.1:{self.cluster_ports[i]}",
                f"  routes: [{routes}]",
                "}",
            ]
        path = self.workdir / f"nats{i}" / "server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_node(self, i: int) -> None:
        conf = self._config(i)
        log = open(self.workdir / f"nats{i}" / "server.log", "ab")  # noqa: SIM115
        self._logs[i] = log
        self.procs[i] = subprocess.Popen(
            [NATS_SERVER, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )

    def start(self, timeout: float = 30) -> NatsCluster:
        require_nats()
        for i in range(self.n):
            self.start_node(i)
        self.wait_ready(timeout)
        return self

    def _get(self, i: int, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_ports[i]}{path}"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every live node answers and JetStream has a meta leader."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                for i in self.alive():
                    jsz = self._get(i, "/jsz")
                    if self.n > 1 and not (jsz.get("meta_cluster") or {}).get("leader"):
                        raise AssertionError("no meta leader yet")
                    health = self._get(i, "/healthz")
                    if health.get("status") != "ok":
                        raise AssertionError(f"n{i}: {health}")
                return
            except (OSError, AssertionError, ValueError) as exc:
                last = exc
                time.sleep(0.1)
        raise AssertionError(f"nats cluster not ready within {timeout}s: {last}\n{self.logs()}")

    def leader(self, stream: str, account: str = "$G") -> int:
        """Index of the node leading ``stream``."""
        for i in self.alive():
            with contextlib.suppress(OSError, ValueError):
                jsz = self._get(i, f"/jsz?streams=true&acc={account}")
                for acc in jsz.get("account_details") or []:
                    for st in acc.get("stream_detail") or []:
                        if st.get("name") == stream:
                            name = (st.get("cluster") or {}).get("leader")
                            if name:
                                return int(name.removeprefix("n"))
        raise AssertionError(f"no leader for stream {stream}")

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def restart(self, i: int) -> None:
        self.kill(i)
        self.start_node(i)

    def logs(self) -> str:
        out = []
        for i in range(self.n):
            path = self.workdir / f"nats{i}" / "server.log"
            if path.exists():
                out.append(f"--- n{i}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for i, proc in enumerate(self.procs):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            if self._logs[i] is not None:
                self._logs[i].close()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
