"""Cluster nodes for the tests: each a real `fastgate run` (master, admin process, workers)
on loopback port 0 with its own folder (config, local files) and the same [cluster] store.

A node runs in a process group of its own, so a test can SIGKILL the whole node (master and
every child) at once, as a crashed machine would, and start it again from the same folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from conftest import ADMIN_TOKEN, READY_TIMEOUT, _readline_with_deadline, basic_config, wait_port

NODE_EXTRA = """
[keys]
store = "local/keys.db"
capacity = {capacity}
[cluster]
store = "{url}"
node_id = "{node_id}"
ack_timeout = {ack_timeout}
connect_timeout = 2.0
[[routes]]
name = "keyed"
path = "/echo"
upstream = "app"
auth = "key"
"""


class Node:
    """One cluster node; start() again after kill() restarts it on the same folder."""

    def __init__(self, folder: Path, config_text: str, node_id: str, workers: int = 1):
        self.folder = folder
        self.node_id = node_id
        self.workers = workers
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "gateway.toml"
        self.config_path.write_text(config_text)
        self.log_path = folder / "node.log"
        self.proc: subprocess.Popen | None = None
        self.url = self.admin_url = ""
        self._admin = self._data = None

    def start(self, wait_ready: bool = True) -> "Node":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "--config", str(self.config_path), "--workers",
             str(self.workers), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=log, cwd=str(self.folder), start_new_session=True,
            env={**os.environ, "FASTGATE_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        log.close()
        try:
            m, banner = _readline_with_deadline(self.proc, time.monotonic() + READY_TIMEOUT,
                                                r"listening on http://127\.0\.0\.1:(\d+)")
            found = [m2 for line in banner if (m2 := re.search(r"admin API on (http://\S+)", line))]
            if not found:
                found = [_readline_with_deadline(self.proc, time.monotonic() + 10, r"admin API on (http://\S+)")[0]]
        except BaseException:
            self.kill()
            raise
        self.url = f"http://127.0.0.1:{m.group(1)}"
        self.admin_url = found[0].group(1)
        self.close_clients()
        self._admin = httpx.Client(base_url=self.admin_url, timeout=10,
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        self._data = httpx.Client(base_url=self.url, timeout=10)
        wait_port(int(m.group(1)))
        if wait_ready:
            self.wait_ready()
        return self

    def admin(self, method: str, path: str, json=None, expect: int | None = None) -> httpx.Response:
        r = self._admin.request(method, path, json=json)
        if expect is not None:
            assert r.status_code == expect, (self.node_id, r.status_code, r.text)
        return r

    def get(self, key: str) -> int:
        """The status of one request with this key on this node's data plane."""
        return self._data.get("/echo/x", headers={"x-api-key": key}).status_code

    def ready(self) -> httpx.Response:
        return self._admin.get("/readyz")

    def wait_ready(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            r = self.ready()
            if r.status_code == 200:
                return r.json()
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.node_id} not ready after {timeout}s: {r.text}\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        text = self.admin("GET", "/metrics", expect=200).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(fastgate_cluster_\w+) (\S+)$", text, re.M)}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close_clients(self) -> None:
        for c in (self._admin, self._data):
            if c is not None:
                c.close()
        self._admin = self._data = None

    def kill(self) -> None:
        """SIGKILL the whole node (its process group), as a crash would."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reap_group()
        self.proc.stdout.close()
        self.proc = None
        self.close_clients()

    def _reap_group(self) -> None:
        # the master's children are reparented when it dies: wait until none is left
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        self.proc.stdout.close()
        self.proc = None
        self.close_clients()


def node_config(upstream, url: str, node_id: str, ack_timeout: float = 1.0, capacity: int = 1024) -> str:
    return basic_config(upstream, extra=textwrap.dedent(NODE_EXTRA).format(
        url=url, node_id=node_id, ack_timeout=ack_timeout, capacity=capacity))
