"""HOT PATH. The access log: one JSON line per request, buffered per worker.

Lines are encoded into one reused buffer with a reused msgspec Encoder and
written with a single os.write when the buffer passes FLUSH_BYTES or on the
worker's timer tick, so a request never waits for the disk.

Whole lines or nothing: every worker appends to the same file (O_APPEND), each
through its own open file, and holds an flock on it around each flush. When a
write comes up short (disk full midway, file size limit), the flush cuts the
file back to the end of its last whole line before it lets go of the lock, so
no torn line remains and no other worker's lines land after half of one. The
lines that could not be written are dropped and counted (`dropped`), with one
warning per incident and one note when writing works again; every later flush
tries again, so logging resumes by itself when space comes back (a file that
could not even be opened is retried once a second). The log never takes a
worker down. SIGUSR1 reopens the file (logrotate's habit: move the file, then
signal). "stdout" is written as a stream, without the lock or the cut: a pipe
or terminal has no torn tail to remove, and the workers share that one open
file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import time

import msgspec


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
    __slots__ = ("target", "fd", "buf", "enc", "failed", "dropped", "lines", "locked", "pending", "_incident",
                 "_reopen_at", "_sec", "_stamp", "_ms", "_ms_stamp")

    def __init__(self, target: str):
        self.target = target
        self.fd = -1
        self.buf = bytearray()
        self.enc = msgspec.json.Encoder()
        self.failed = False  # inside an incident: warned once, lines being dropped
        self.dropped = 0  # lines lost to failed writes, ever
        self.lines = 0  # lines written, ever
        self.locked = False  # a regular file we opened: flock + cut back on a short write
        self.pending = 0  # lines in buf
        self._incident = 0  # `dropped` when the current incident began
        self._reopen_at = 0.0
        self._sec = -1
        self._stamp = ""
        self._ms = -1
        self._ms_stamp = ""
        self.open()

    def open(self) -> None:
        if self.target == "stdout":
            self.fd = 1
            self.locked = False
            return
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            self._reopen_at = time.monotonic() + 1.0
            self._fail(exc)
            return
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        old, self.fd = self.fd, fd
        self.locked = regular
        if old > 2:
            os.close(old)

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
        self.pending += 1
        if len(self.buf) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        buf = self.buf
        if not buf:
            return
        if self.fd < 0 and self.target != "stdout" and time.monotonic() >= self._reopen_at:
            self.open()  # the file could not be opened: try again, once a second
        n = self.pending
        self.pending = 0
        if self.fd < 0:
            self.dropped += n
            buf.clear()
            return
        data = bytes(buf)
        buf.clear()
        if self.locked:
            self._write_lines(data, n)
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self._fail(exc)
            self.dropped += data.count(b"\n", len(data) - len(view)) or 1
        else:
            self._written(n)

    def _write_lines(self, data: bytes, n: int) -> None:
        """Append data (n whole lines) under the file's flock; on a short write,
        cut the file back to the last whole line written and count the rest."""
        fd = self.fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            self._fail(exc)
            self.dropped += n
            return
        try:
            start = os.lseek(fd, 0, os.SEEK_END)  # where O_APPEND puts our bytes: every writer holds the lock
            done = 0
            try:
                while done < len(data):
                    done += os.write(fd, data[done:] if done else data)
            except OSError as exc:
                keep = data.rfind(b"\n", 0, done) + 1  # 0 when not one whole line made it
                if keep != done:
                    try:
                        os.ftruncate(fd, start + keep)
                    except OSError as texc:  # cannot happen on a local file system; say so if it does
                        log.error("access log %s: could not cut a torn line at offset %d: %s",
                                  self.target, start + keep, texc.strerror or texc)
                self.lines += data.count(b"\n", 0, keep)  # not a recovery: the flush fell short
                self._fail(exc)
                self.dropped += data.count(b"\n", keep)
            else:
                self._written(n)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _written(self, n: int) -> None:
        self.lines += n
        if self.failed:
            self.failed = False
            log.warning("access log %s: writing again; %d lines were dropped", self.target,
                        self.dropped - self._incident)

    def _fail(self, exc: OSError) -> None:
        if not self.failed:  # one warning per incident: it ends at the next whole write
            self.failed = True
            self._incident = self.dropped
            log.error("access log %s: %s; dropping lines until it can be written again",
                      self.target, exc.strerror or exc)

    def close(self) -> None:
        self.flush()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
