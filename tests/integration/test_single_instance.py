"""One gateway per key store: a second `fastgate run` on the same store refuses
to start (before it binds a socket), naming the lock file and the running pid;
read-only tools keep working; a lock left by a SIGKILLed gateway never blocks
a new start, but a surviving process of the old gateway does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from conftest import ADMIN_TOKEN, _readline_with_deadline, basic_config, wait_for


def run_cli(*args, cwd, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastgate", *args], capture_output=True, text=True, cwd=str(cwd),
                          timeout=timeout, env={**os.environ, "FASTGATE_ADMIN_TOKEN": ADMIN_TOKEN})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie counts as gone (its parent, the killed master, is not there to reap it).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_second_gateway_on_the_same_store_refuses(start_gateway, upstream, tmp_path):
    gw = start_gateway(basic_config(upstream, extra='[keys]\nstore = "data/keys.db"\n'), workers=2)
    store = tmp_path / "data" / "keys.db"
    lock = tmp_path / "data" / "keys.db.lock"
    assert lock.read_text().strip() == str(gw.proc.pid)
    # The same file, spelled another way: another folder, '..', and a symlinked folder.
    (tmp_path / "other").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "other" / "linked")
    busy = socket.socket()  # no SO_REUSEPORT: a second gateway that bound first would fail on it instead
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        for spelling in ("../data/keys.db", "linked/keys.db"):
            cfg = tmp_path / "other" / "gateway.toml"
            cfg.write_text(basic_config(upstream, extra=f'[keys]\nstore = "{spelling}"\n'))
            out = run_cli("run", "--config", str(cfg), "--workers", "2", "--admin-listen", "127.0.0.1:0",
                          "--listen", f"127.0.0.1:{busy.getsockname()[1]}", cwd=tmp_path / "other")
            assert out.returncode == 1, (out.stdout, out.stderr)
            err = out.stderr.strip().splitlines()
            assert len(err) == 1, out.stderr
            assert err[0].startswith("fastgate: cannot start: key store ")
            assert f"master pid {gw.proc.pid}" in err[0] and str(lock) in err[0], err[0]
            assert out.stdout == ""
        # Tools that only read the store keep working beside the running gateway.
        assert run_cli("check-config", str(cfg), cwd=tmp_path).returncode == 0
        verify = run_cli("audit", "verify", "--store", str(store), cwd=tmp_path)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        busy.close()
    # The first gateway is untouched.
    assert httpx.get(gw.url + "/echo/still-one", timeout=5).status_code == 200
    assert lock.read_text().strip() == str(gw.proc.pid)


def test_lock_outlives_the_master_while_its_workers_live_and_stale_lock_is_no_obstacle(start_gateway, upstream,
                                                                                       tmp_path):
    config = basic_config(upstream)
    gw = start_gateway(config, workers=2)
    master = gw.proc.pid
    workers = gw.worker_pids()
    admin = gw.admin_pid()
    lock = tmp_path / "fastgate-data" / "keys.db.lock"
    assert lock.read_text().strip() == str(master)
    # A worker that cannot exit yet (stopped), then the master dies: the old gateway
    # still has a process serving from its own key table, so no new one may start.
    os.kill(workers[0], signal.SIGSTOP)
    try:
        gw.proc.send_signal(signal.SIGKILL)
        gw.proc.wait(10)
        assert wait_for(lambda: not alive(workers[1]) and not alive(admin), 15)
        again = tmp_path / "again.toml"
        again.write_text(config)
        out = run_cli("run", "--config", str(again), "--workers", "1", "--listen", "127.0.0.1:0",
                      "--admin-listen", "127.0.0.1:0", cwd=tmp_path)
        assert out.returncode == 1
        assert f"left by the gateway with master pid {master} (it has exited" in out.stderr, out.stderr
    finally:
        os.kill(workers[0], signal.SIGKILL)
    assert wait_for(lambda: not alive(workers[0]), 10)
    # Every holder is dead: the lock file (with its stale pid) is still there and no obstacle.
    assert lock.read_text().strip() == str(master)
    gw2 = start_gateway(config, workers=2, name="again.toml")
    assert lock.read_text().strip() == str(gw2.proc.pid)
    assert httpx.get(gw2.url + "/echo/second-life", timeout=5).status_code == 200


def test_embedded_default_locks_its_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTGATE_ADMIN_TOKEN"}
    first = subprocess.Popen(
        [sys.executable, "-m", "fastgate", "run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--workers", "1", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(tmp_path), env=env,
    )
    try:
        _readline_with_deadline(first, time.monotonic() + 30, r"listening on http://")
        (tmp_path / "sub").mkdir()
        out = subprocess.run(
            [sys.executable, "-m", "fastgate", "run", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--workers", "1", "--data-dir", "../data"],
            capture_output=True, text=True, cwd=str(tmp_path / "sub"), env=env, timeout=30,
        )
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"master pid {first.pid}" in out.stderr and str(tmp_path / "data" / "keys.db.lock") in out.stderr
        assert "demo upstream" not in out.stdout  # refused before the demo upstream was started
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(15)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            first.stdout.close()
