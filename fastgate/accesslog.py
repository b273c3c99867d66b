"""HOT PATH. The access log: one JSON line per request, buffered per worker.

Lines are encoded into one reused buffer with a reused msgspec Encoder and
written with a single os.write when the buffer passes FLUSH_BYTES or on the
worker's timer tick, so a request never waits for the disk. A failed write
(full disk, file removed, EBADF) is reported once, counted, and the buffered
lines are dropped: the log never takes a worker down. SIGUSR1 reopens the file
(logrotate's habit: move the file, then signal).
"""

from __future__ import annotations

import logging
import os
import time

import msgspec

from .errors import STAGE_OF  # noqa: F401  (re-exported: which stage answered)

log = logging.getLogger("fastgate.accesslog")

FLUSH_BYTES = 64 * 1024


class AccessRecord(msgspec.Struct, gc=False, omit_defaults=True):
    """One line. Never holds a key: key_id is the public id. Build it with
    positional arguments on the hot path (keywords cost 4x as much)."""

    time: str
    request_id: str
    client_ip: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    total_us: int  # request head complete -> response complete, microseconds
    route: str | None = None
    key_id: str | None = None
    owner: str | None = None
    plan: str | None = None
    upstream: str | None = None
    upstream_us: int | None = None  # request head -> upstream response head
    decision: str | None = None  # the stage that refused the request, if one did
    error: str | None = None


class AccessLog:
    __slots__ = ("target", "fd", "buf", "enc", "failed", "dropped", "lines", "_sec", "_stamp", "_ms", "_ms_stamp")

    def __init__(self, target: str):
        self.target = target
        self.fd = -1
        self.buf = bytearray()
        self.enc = msgspec.json.Encoder()
        self.failed = False
        self.dropped = 0
        self.lines = 0
        self._sec = -1
        self._stamp = ""
        self._ms = -1
        self._ms_stamp = ""
        self.open()

    def open(self) -> None:
        if self.target == "stdout":
            self.fd = 1
            return
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._fail(exc)
            return
        old, self.fd = self.fd, fd
        if old > 2:
            os.close(old)
        self.failed = False

    def reopen(self) -> None:
        """SIGUSR1: flush what we hold to the old file, then open the path anew."""
        self.flush()
        self.open()

    def stamp(self) -> str:
        """UTC time with milliseconds, formatted once per millisecond."""
        ms = int(time.time() * 1000)
        if ms != self._ms:
            sec = ms // 1000
            if sec != self._sec:
                self._sec = sec
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._ms = ms
            self._ms_stamp = f"{self._stamp}.{ms % 1000:03d}Z"
        return self._ms_stamp

    def record(self, rec: AccessRecord) -> None:
        self.enc.encode_into(rec, self.buf, -1)
        self.buf += b"\n"
        self.lines += 1
        if len(self.buf) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        buf = self.buf
        if not buf:
            return
        if self.fd < 0:
            self.dropped += buf.count(b"\n")
            buf.clear()
            return
        data = bytes(buf)
        buf.clear()
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError as exc:
            self.dropped += data.count(b"\n") or 1
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        if not self.failed:  # report once until a write succeeds again after reopen
            self.failed = True
            log.error("access log %s: %s; dropping lines until it can be written (SIGUSR1 reopens)",
                      self.target, exc.strerror or exc)

    def close(self) -> None:
        self.flush()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
