"""`python -m bench --smoke` (bench/suite.py) runs end to end and reports: a table and a JSON file.

Not a speed assertion. Uses the built-in load generator and upstream, so it needs neither wrk nor
nginx; everything is on 127.0.0.1, and the suite's process group is killed whatever happens.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(90)


def test_bench_smoke(tmp_path):
    out = tmp_path / "suite.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--smoke", "--plain-progress", "--output", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # SIGTERM lets the suite stop what it started; SIGKILL if it will not
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:  # whatever the suite itself started (own sessions) is stopped by its try/finally
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert "load generator: builtin" in stdout
    assert "| scenario | routes | keys | workers | target | requests/s |" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith(("| plain |", "| key |"))]
    assert len(rows) == 2, stdout
    assert str(out) in stdout

    report = json.loads(out.read_text())
    assert report["benchmark"] == "suite"
    assert report["commit"] and report["settings"]["generator"] == "builtin"
    assert report["settings"]["nginx"] is False
    assert set(report["machine"]) >= {"nproc", "kernel", "python"}
    figs = report["figures"]
    assert sorted(f["scenario"] for f in figs.values()) == ["key", "plain"]
    for fig in figs.values():
        s = fig["fastgate"]
        assert s["requests"] > 0 and s["rps"] > 0 and s["errors"] == 0, fig
        assert s["p50_ms"] <= s["p99_ms"] <= s["p999_ms"], fig
        assert s["cpu_us_per_req"] > 0 and s["worker_rss_mb"] > 0, fig
        assert "nginx" not in fig
