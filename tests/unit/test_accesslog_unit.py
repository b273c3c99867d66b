"""AccessLog writes whole lines or nothing, counts what it drops, warns once per
incident and resumes by itself.

A real short write comes from the kernel: a forked child lowers RLIMIT_FSIZE
(writes past it come up short, then fail with EFBIG, as on a full disk), runs
the log, and reports back through a pipe; raising the limit again plays
"space came back".
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal

from fastgate.accesslog import AccessLog, AccessRecord


def rec(i: int) -> AccessRecord:
    return AccessRecord("2024-01-01T00:00:00.000Z", f"req-{i:06d}", "127.0.0.1", "GET", "/echo/" + "x" * (i % 37),
                        200, 0, 10, 123, route="app")


def in_child(body) -> dict:
    """Run body() in a forked child (it may change rlimits); return what it returns."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            out = body()
            os.write(w, json.dumps(out).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[int, str]] = []

    def emit(self, record):
        self.seen.append((record.levelno, record.getMessage()))


def test_short_write_leaves_only_whole_lines_and_resumes(tmp_path):
    path = str(tmp_path / "access.log")

    def body():
        handler = Records()
        logging.getLogger("fastgate.accesslog").addHandler(handler)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
        alog = AccessLog(path)
        n = 0
        for _ in range(3):  # three flushes that do not fit: one incident
            for _ in range(150):
                alog.record(rec(n))
                n += 1
            alog.flush()
        full = os.path.getsize(path)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space comes back
        for _ in range(10):
            alog.record(rec(n))
            n += 1
        alog.flush()
        alog.close()
        return {"recorded": n, "lines": alog.lines, "dropped": alog.dropped, "size_when_full": full,
                "log": handler.seen}

    out = in_child(body)
    assert "error" not in out, out
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    got = [json.loads(line)["request_id"] for line in lines]  # every line parses
    assert 0 < out["size_when_full"] <= 10_000
    assert len(got) == out["lines"] and out["lines"] + out["dropped"] == out["recorded"]
    assert len(set(got)) == len(got)
    assert got[-10:] == [f"req-{i:06d}" for i in range(out["recorded"] - 10, out["recorded"])]  # resumed
    errors = [m for lvl, m in out["log"] if lvl >= logging.ERROR]
    assert len(errors) == 1 and "dropping lines" in errors[0], out["log"]
    notes = [m for lvl, m in out["log"] if lvl == logging.WARNING]
    assert notes == [f"access log {path}: writing again; {out['dropped']} lines were dropped"]


def test_each_incident_warns_once(tmp_path):
    path = str(tmp_path / "access.log")

    def body():
        handler = Records()
        logging.getLogger("fastgate.accesslog").addHandler(handler)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        alog = AccessLog(path)
        n = 0
        for limit in (4_000, 8_000):  # two incidents, each followed by recovery
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            for _ in range(2):
                for _ in range(60):
                    alog.record(rec(n))
                    n += 1
                alog.flush()
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            alog.record(rec(n))
            n += 1
            alog.flush()
        alog.close()
        return {"log": handler.seen, "lines": alog.lines, "dropped": alog.dropped, "recorded": n}

    out = in_child(body)
    assert "error" not in out, out
    levels = [lvl for lvl, _ in out["log"]]
    assert levels == [logging.ERROR, logging.WARNING, logging.ERROR, logging.WARNING], out["log"]
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n") and len(data.split(b"\n")[:-1]) == out["lines"]
    assert all(json.loads(line) for line in data.split(b"\n")[:-1])
    assert out["lines"] + out["dropped"] == out["recorded"]


def test_file_that_cannot_be_opened_is_retried(tmp_path):
    path = tmp_path / "later" / "access.log"
    alog = AccessLog(str(path))
    assert alog.fd < 0 and alog.failed
    alog.record(rec(1))
    alog.flush()
    assert alog.dropped == 1
    path.parent.mkdir()
    alog._reopen_at = 0.0  # the once-a-second retry is due
    alog.record(rec(2))
    alog.flush()
    alog.close()
    assert [json.loads(line)["request_id"] for line in path.read_text().splitlines()] == ["req-000002"]
    assert alog.lines == 1 and not alog.failed
