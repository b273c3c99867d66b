"""Shared fixtures: a real upstream process and a real multi-worker gateway.

Everything listens on 127.0.0.1 port 0, is probed for readiness before use,
and is stopped in teardown.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-0123456789"
READY_TIMEOUT = 30.0


class Upstream:
    def __init__(self, proc, port, flaky_port):
        self.proc = proc
        self.port = port
        self.flaky_port = flaky_port
        self.addr = f"127.0.0.1:{port}"
        self.flaky_addr = f"127.0.0.1:{flaky_port}"


def _readline_with_deadline(proc, deadline, pattern):
    """Read the process's stdout until a line matches (bounded in time)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = []
    # A partial last line stays with the process for the next call: a line
    # may arrive in two reads (print writes the text and the newline apart).
    buf = getattr(proc, "_partial", b"")
    proc._partial = b""
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None and not sel.select(0):
                break
            if not sel.select(0.2):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            found = None
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                seen.append(text)  # lines after the match stay visible to the caller
                if found is None:
                    found = re.search(pattern, text)
            if found:
                proc._partial = buf
                return found, seen
    finally:
        sel.close()
    raise RuntimeError(f"process did not become ready; output so far: {seen!r}")


@pytest.fixture(scope="session")
def upstream():
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "upstream_app.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        m, _ = _readline_with_deadline(proc, time.monotonic() + READY_TIMEOUT, r"PORTS (\d+) (\d+)")
        yield Upstream(proc, int(m.group(1)), int(m.group(2)))
    finally:
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


class Gateway:
    """A running `fastgate run` (master + workers) on a free loopback port."""

    def __init__(self, config_path: Path, workers: int, extra_args=()):
        self.config_path = config_path
        self.workers = workers
        self.log_path = config_path.with_suffix(".log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastgate", "run", "--config", str(config_path),
             "--workers", str(workers), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *extra_args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=str(config_path.parent),
            env={**os.environ, "FASTGATE_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        try:
            m, self.banner = _readline_with_deadline(
                self.proc, time.monotonic() + READY_TIMEOUT, r"listening on http://127\.0\.0\.1:(\d+)"
            )
        except BaseException:
            # Never leave a half-started gateway (and its workers) behind.
            kids = self.child_pids()
            self.proc.kill()
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            self.proc.stdout.close()
            self._log.close()
            raise
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        found = [m for line in self.banner if (m := re.search(r"admin API on (http://\S+)", line))]
        if not found:  # printed with the same write, but be robust to a split read
            m, more = _readline_with_deadline(self.proc, time.monotonic() + 10, r"admin API on (http://\S+)")
            self.banner += more
            found = [m]
        self.admin_url = found[0].group(1)
        wait_port(self.port)

    def admin(self, method: str, path: str, json=None, expect: int | None = None):
        """Call the admin API with the test token; returns the httpx response."""
        import httpx

        r = httpx.request(method, self.admin_url + path, json=json, timeout=10,
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        if expect is not None:
            assert r.status_code == expect, (r.status_code, r.text)
        return r

    def child_pids(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return sorted(int(p) for p in out.stdout.split())

    def admin_pid(self) -> int:
        import httpx

        return httpx.get(self.admin_url + "/healthz", timeout=5).json()["admin_pid"]

    def worker_pids(self) -> list[int]:
        admin = self.admin_pid()
        return [p for p in self.child_pids() if p != admin]

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                for pid in self.child_pids():
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


def wait_for(pred, timeout: float, step: float = 0.05):
    """Poll pred until it returns something true or timeout passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not accepting connections")


def basic_config(upstream: Upstream, extra: str = "", upstream_extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        [server]
        drain_timeout = 10.0
        [[upstreams]]
        name = "app"
        targets = ["{upstream.addr}"]
        {upstream_extra}
        [[upstreams]]
        name = "flaky"
        targets = ["{upstream.flaky_addr}"]
        [[routes]]
        name = "app"
        path = "/"
        upstream = "app"
        auth = "none"
        [[routes]]
        name = "flaky"
        path = "/flaky"
        upstream = "flaky"
        auth = "none"
        """
    ) + textwrap.dedent(extra)


@pytest.fixture
def start_gateway(tmp_path):
    """Factory: start_gateway(config_text, workers=2) -> Gateway; all stopped after."""
    started: list[Gateway] = []

    def start(config_text: str, workers: int = 2, name: str = "gateway.toml", extra_args=()) -> Gateway:
        path = tmp_path / name
        path.write_text(config_text)
        gw = Gateway(path, workers, extra_args)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(start_gateway, upstream):
    return start_gateway(basic_config(upstream))


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything received until the server closes
    (or the timeout passes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
            if not read_until_close and b"\r\n\r\n" in out:
                break
        return out
    finally:
        s.close()


@pytest.fixture(scope="session")
def pg():
    """A real PostgreSQL server for the session (tests/pg_kit.py); started on first use."""
    from pg_kit import PgServer

    server = PgServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg):
    """A fresh, empty database on the session's server; its URL."""
    if not pg.running():  # a test that stopped the server and failed before starting it again
        pg.start()
    return pg.new_database()
