"""bench_accesslog: what the whole-lines access log costs per flush.

Run: pytest bench/micro/bench_accesslog.py --benchmark-only --benchmark-columns=median,iqr,rounds

AccessLog.flush on a regular file takes an flock, finds the end of the file,
writes, and unlocks (so a short write can be cut back to whole lines); the
"plain" rows are the single unlocked os.write loop it replaced. Each round
flushes a full 64 KiB buffer (the size that triggers a flush) or one line (a
timer-tick flush under light load). The file is truncated now and then so it
stays in the page cache. Numbers are printed, never asserted.
"""

import os

import pytest

from fastgate.accesslog import FLUSH_BYTES, AccessLog, AccessRecord

REC = AccessRecord("2024-01-01T00:00:00.000Z", "0123456789abcdef-00000001", "127.0.0.1", "GET", "/orders/12345?x=1",
                   200, 0, 512, 180, route="orders", key_id="k123", owner="acme", plan="free",
                   upstream="127.0.0.1:9000", upstream_us=150, decision="proxied")


def _line(alog):
    out = bytearray()
    alog.enc.encode_into(REC, out, -1)
    return bytes(out) + b"\n"


@pytest.fixture
def alog(tmp_path):
    a = AccessLog(str(tmp_path / "access.log"))
    yield a
    a.close()


def _plain_flush(alog):
    """The flush before whole-lines: one unlocked write loop."""
    data = bytes(alog.buf)
    alog.buf.clear()
    alog.pending = 0
    while data:
        data = data[os.write(alog.fd, data):]


@pytest.mark.parametrize("size", ["64KiB", "1line"])
@pytest.mark.parametrize("kind", ["plain", "locked"])
def test_flush(benchmark, alog, kind, size):
    line = _line(alog)
    n = FLUSH_BYTES // len(line) + 1 if size == "64KiB" else 1
    chunk = line * n
    flush = alog.flush if kind == "locked" else (lambda: _plain_flush(alog))
    count = [0]

    def setup():
        count[0] += 1
        if count[0] % 1000 == 0:
            os.ftruncate(alog.fd, 0)
        alog.buf += chunk
        alog.pending += n

    benchmark.pedantic(flush, setup=setup, rounds=3000 if size == "1line" else 1000, warmup_rounds=20)
    assert alog.dropped == 0
