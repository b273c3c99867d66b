"""Disk full: the access log keeps whole lines only, traffic is served throughout,
and logging resumes by itself when space comes back.

The log lives on a small tmpfs mounted in a private mount namespace of the
gateway (`unshare -m`, or `unshare -Urm` when not root), so nothing is mounted
on the host and nothing is left behind if the test dies; the test reaches the
files through /proc/<master pid>/root. The disk is filled to the last byte and
then a few pages are freed, so a flush finds room for part of its lines: the
case that used to leave a torn line with the next worker's lines after it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_TOKEN, READY_TIMEOUT, _readline_with_deadline, basic_config, raw_exchange, wait_port, wait_for


def mount_namespace_prefix(mountpoint: Path) -> list[str]:
    """The unshare(1) command line that may mount a tmpfs here: root's own mount
    namespace (CI runs as root), else a user namespace."""
    tried = []
    for prefix in (["unshare", "-m", "--propagation", "private"], ["unshare", "-Urm"]):
        out = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=4k fastgate-probe "$0"', str(mountpoint)],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return prefix
        tried.append(f"{' '.join(prefix)}: {out.stderr.strip()}")
    raise AssertionError("cannot mount a private tmpfs for the disk-full test (needs root or user namespaces): "
                         + "; ".join(tried))


class PrivateTmpfsGateway:
    """`fastgate run --workers 2` with `mountpoint` a tmpfs of `size` that only it sees."""

    def __init__(self, config_path: Path, mountpoint: Path, size: str):
        self.stderr_path = config_path.with_suffix(".log")
        script = f'mount -t tmpfs -o size={size},mode=0755 fastgate-test "$0" && exec "$@"'
        prefix = mount_namespace_prefix(mountpoint)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*prefix, "sh", "-c", script, str(mountpoint),
                 sys.executable, "-m", "fastgate", "run", "--config", str(config_path), "--workers", "2",
                 "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
                stdout=subprocess.PIPE, stderr=err, cwd=str(config_path.parent),
                env={**os.environ, "FASTGATE_ADMIN_TOKEN": ADMIN_TOKEN},
            )
        try:
            m, banner = _readline_with_deadline(self.proc, time.monotonic() + READY_TIMEOUT,
                                                r"listening on http://127\.0\.0\.1:(\d+)")
            admin = [re.search(r"admin API on (http://\S+)", x) for x in banner]
            admin = [a for a in admin if a] or [
                _readline_with_deadline(self.proc, time.monotonic() + 10, r"admin API on (http://\S+)")[0]]
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{int(m.group(1))}"
        self.admin_url = admin[0].group(1)
        wait_port(int(m.group(1)))
        # The gateway's view of the mount (unshare execs: the pid is the master's).
        self.fs = Path(f"/proc/{self.proc.pid}/root") / mountpoint.relative_to("/")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def metrics(self) -> dict:
        r = httpx.get(self.admin_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
        assert r.status_code == 200
        return {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples if not s.labels}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def fill(path: Path) -> int:
    """Write until the file system is full; bytes written."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            block = b"f" * size
            while True:
                try:
                    n += os.write(fd, block)
                except OSError:
                    break
    finally:
        os.close(fd)
    return n


def whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line parses


def test_full_disk_leaves_no_torn_line_and_logging_resumes(tmp_path, upstream):
    mnt = tmp_path / "logfs"
    mnt.mkdir()
    config = tmp_path / "gateway.toml"
    config.write_text(basic_config(upstream, extra=f'\n[log]\naccess = "{mnt}/access.log"\n'))
    gw = PrivateTmpfsGateway(config, mnt, "256k")
    try:
        log_path = gw.fs / "access.log"
        assert not (tmp_path / "logfs" / "access.log").exists()  # the mount is not the host's

        port = int(gw.url.rsplit(":", 1)[1])

        def served(tag: str, n: int) -> None:
            for i in range(n):  # a fresh connection each: both workers log
                out = raw_exchange(port, f"GET /echo/{tag}/{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                                   .encode())
                assert out.startswith(b"HTTP/1.1 200 "), (tag, i, out[:200])

        served("before", 30)
        assert wait_for(lambda: log_path.exists() and len(whole_lines(log_path)) == 30, 10)

        filler = gw.fs / "filler"
        size = fill(filler)
        assert size > 0
        os.truncate(filler, size - 10_000)  # two or three pages free: room for part of a flush
        served("full", 400)  # traffic is served throughout
        time.sleep(1.0)  # every worker has flushed (tick) at least once more
        lines = whole_lines(log_path)
        assert {x["path"] for x in lines[:30]} == {f"/echo/before/{i}" for i in range(30)}
        assert sum(1 for x in lines if x["path"].startswith("/echo/full/")) < 400  # the disk really was full

        filler.unlink()  # space comes back
        served("after", 50)

        def resumed():
            got = [x["path"] for x in whole_lines(log_path) if x["path"].startswith("/echo/after/")]
            return len(got) == 50

        assert wait_for(resumed, 10), whole_lines(log_path)[-5:]
        lines = whole_lines(log_path)
        assert len({x["request_id"] for x in lines}) == len(lines)  # no line written twice

        def settled():
            m = gw.metrics()
            return m if m.get("fastgate_access_log_lines_total") == len(lines) else None

        m = wait_for(settled, 10)
        assert m, (gw.metrics(), len(lines))
        # Every request is either a whole line in the file or counted as dropped.
        assert m["fastgate_access_log_dropped_total"] == 480 - len(lines) > 0
        text = gw.log()
        # One warning per worker for the incident, and one note each when writing works again.
        warned = text.count("dropping lines until it can be written again")
        assert 1 <= warned <= 2, text
        assert text.count("writing again;") == warned, text
    finally:
        gw.stop()
