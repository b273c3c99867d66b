"""A real PostgreSQL server for the tests: `initdb` in a temp dir and `postgres` on a free
loopback port, stopped after the session. Debian's binaries (/usr/lib/postgresql/*/bin,
the `postgresql` package .ci/run installs) or any on PATH. There is no skip: a machine
without PostgreSQL fails these tests with a message that says what to install.

initdb and postgres refuse to run as root, and CI runs as root: then the server runs as
an unprivileged user (`postgres`, which the Debian package creates, else `fastgate-pg`,
created with useradd) through `runuser`, in a temp dir that user owns. Speed: fsync=off
(the tests crash the server process, never the machine, so committed data survives in the
page cache; synchronous_commit stays on, so a COMMIT still waits for its WAL write)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

SUPERUSER = "fastgate"


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise RuntimeError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb and no initdb on PATH): "
                       "apt-get install -y postgresql (the cluster-store tests need a real server)")


def _run_as_user() -> str | None:
    """The user to run the server as, or None to run it as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "fastgate-pg"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "fastgate-pg"],
                   check=True, capture_output=True)
    return "fastgate-pg"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class PgServer:
    def __init__(self) -> None:
        self.bindir = _bindir()
        self.user = _run_as_user()
        self.root = tempfile.mkdtemp(prefix="fastgate-pg-")
        self.data = os.path.join(self.root, "data")
        self.logfile = os.path.join(self.root, "server.log")
        self.port = free_port()
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._cmd([os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", SUPERUSER, "--auth=trust",
                   "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"], timeout=120)
        self.start()

    def _cmd(self, argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stdout}{p.stderr}"
                               f"{self.log_tail()}")
        return p

    def log_tail(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return "\nserver log:\n" + f.read()[-3000:]
        except OSError:
            return ""

    @property
    def base(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}"

    def url(self, db: str = "postgres") -> str:
        return f"{self.base}/{db}"

    def start(self) -> None:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off "
                "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
        self._cmd([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", self.logfile, "-o", opts,
                   "-w", "-t", "60", "start"], timeout=90)

    def stop(self, mode: str = "fast") -> None:
        self._cmd([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"],
                  timeout=90, check=False)

    def running(self) -> bool:
        p = self._cmd([os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "status"], check=False)
        return p.returncode == 0

    def sql(self, statement: str, db: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(db), autocommit=True, connect_timeout=10) as c:
            c.execute(statement)

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        deadline = time.monotonic() + 10
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
