"""The master process: binds, forks workers, supervises, reloads, drains.

The master runs no event loop: it forks (a loop must not cross a fork) and
then waits in a selector on the workers' control sockets and a signal wakeup
socket. Each worker slot owns one SO_REUSEPORT listening socket that the master
keeps open for its whole life, so connections queued on a crashed worker's
socket are served by its replacement instead of being reset.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback

from .. import config as cfg
from ..errors import ConfigError
from .worker import MessageReader, Worker, send_msg

log = logging.getLogger("fastgate.master")

RESTART_BACKOFF_MAX = 5.0
# Worker slots the shared stats segment has room for (a reload may add workers).
MAX_WORKER_SLOTS = 256


class AlreadyRunning(Exception):
    """Another gateway holds the instance lock of this key store."""


class InstanceLock:
    """One gateway per key store: an exclusive flock on ``<store>.lock``.

    Two gateways on one store would each load their own shared key table, so a
    key revoked through one stays valid in the other. `fastgate run` takes this
    lock before it binds a socket or loads a key, and holds it for the life of
    the gateway. The path is the store's real path (symlinks and relative
    spellings resolved) plus ``.lock``, so two configs naming the same file in
    different ways collide. The lock lives on the open file description: forked
    workers and the admin process inherit it, so it is held until the last
    process that serves from this store's key table has exited (even if the
    master was killed first); O_CLOEXEC keeps it from exec'd programs. The file
    holds the master's pid for the error message only: the kernel drops an
    flock when its holders die, so a lock file left by a SIGKILLed gateway
    never blocks a new start. Readers of the store (``fastgate audit verify``,
    ``check-config``) do not take it.
    """

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd

    @staticmethod
    def path_for(store: str) -> str:
        return os.path.realpath(os.path.abspath(store)) + ".lock"

    @classmethod
    def acquire(cls, store: str) -> "InstanceLock":
        """Take the lock for this store or raise AlreadyRunning (one line,
        naming the lock file and the running gateway's pid); OSError when the
        lock file cannot be created at all."""
        path = cls.path_for(store)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            pid = cls._read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(cls._busy_message(path, store, pid)) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informational; the flock is the lock
        return cls(path, fd)

    @staticmethod
    def _read_pid(fd: int) -> int:
        # The winner truncates, then writes its pid: a loser may look in between.
        for _ in range(20):
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text.isdigit():
                return int(text)
            time.sleep(0.025)
        return 0

    @staticmethod
    def _busy_message(path: str, store: str, pid: int) -> str:
        if not pid:
            who = "another gateway"
        else:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
            who = (f"the gateway with master pid {pid}" if alive else
                   f"processes left by the gateway with master pid {pid} (it has exited; see `fuser {path}`)")
        return (f"key store {store} is in use by {who}: {path} is locked; stop that gateway first, "
                f"or give this one its own [keys] store")

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closes our reference; children still holding it keep the lock
            self.fd = -1

    def forget_in_child(self) -> None:
        """In a forked helper that does not serve keys (the demo upstream):
        drop the inherited reference so it cannot outlive the gateway's lock."""
        self.release()


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Slot:
    __slots__ = ("index", "sock", "pid", "ctl", "reader", "ready", "started", "restarts", "respawn_at", "retiring",
                 "kind")

    def __init__(self, index: int, sock: socket.socket, kind: str = "worker"):
        self.kind = kind  # "worker" or "admin"
        self.index = index
        self.sock = sock
        self.pid = 0
        self.ctl = None
        self.reader = None
        self.ready = False
        self.started = 0.0
        self.restarts = 0
        self.respawn_at = 0.0
        self.retiring = False


class Supervisor:
    def __init__(
        self,
        config: cfg.Config,
        config_path: str | None,
        overrides: dict,
        banner_extra: list[str] | None = None,
        extras: list | None = None,
        instance_lock: InstanceLock | None = None,
    ):
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.banner_extra = banner_extra or []
        self.slots: list[Slot] = []
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.announced = False
        self.pending_signals: list[int] = []
        self.extra_children: dict[int, str] = {}
        self.host, self.port = cfg.parse_hostport(config.server.listen)
        self.restarts_total = 0
        self.extras = extras or []  # (name, fn): helper processes, e.g. the demo upstream
        self.admin: Slot | None = None
        self.arena = None
        self.secret = b""
        self.loaded_seq = 0  # the store's change number the key table was loaded at
        self.instance_lock = instance_lock

    def _all(self) -> list[Slot]:
        return self.slots + [self.admin] if self.admin is not None else self.slots

    def _publish_master(self) -> None:
        self.stats.publish(self.stats.slots, {
            "worker_restarts": self.restarts_total,
            "workers": sum(1 for s in self.slots if not s.retiring),
            "workers_ready": sum(1 for s in self.slots if s.ready and not s.retiring),
            "draining": self.stopping,
        })

    def _open_keys(self) -> None:
        """Create the shared arena and load every stored key into it, before any
        fork: workers inherit the mapping, the admin process becomes its writer."""
        from .. import core
        from ..admin import snapshot
        from ..keys import open_config_store

        kc = self.config.keys

        def new_arena():
            return core.Arena.create(key_capacity=kc.capacity, rate_capacity=kc.rate_capacity,
                                     ext_bytes=kc.ext_bytes, auth_capacity=kc.auth_capacity)

        store = open_config_store(self.config)
        try:
            self.secret = store.secret
            # from the key snapshot plus the changes after it when it is usable, else all keys
            self.arena, n, secs, how = snapshot.load(self.config, store, new_arena)
            # The change number the arena holds: the admin process's cluster fan-out replays
            # from it (a change applied twice is harmless).
            self.loaded_seq = snapshot.STATE["seq"]
        finally:
            store.close()
        log.info("loaded %d keys from %s into shared memory in %.2fs (%s; %d MiB segment)",
                 n, store.path, secs, how, self.arena.size >> 20)

    # -- lifecycle --------------------------------------------------------------
    def worker_count(self, config: cfg.Config) -> int:
        return config.server.workers or os.cpu_count() or 1

    def run(self) -> int:
        from ..stats import StatsSegment

        if self.instance_lock is None:  # before any socket or key: see InstanceLock
            self.instance_lock = InstanceLock.acquire(self.config.keys.store)
        self._open_keys()
        self.stats = StatsSegment(MAX_WORKER_SLOTS)
        n = self.worker_count(self.config)
        for i in range(n):
            self._add_slot()
        ahost, aport = cfg.parse_hostport(self.config.admin.listen)
        self.admin = Slot(-1, bind_socket(ahost, aport, 128), kind="admin")
        self.admin_url = f"http://{'[%s]' % ahost if ':' in ahost else ahost}:{self.admin.sock.getsockname()[1]}"
        self._install_signals()
        for name, fn in self.extras:
            self._spawn_extra(name, fn)
        for slot in self._all():
            self._spawn(slot)
        try:
            self._loop()
        finally:
            for slot in self._all():
                slot.sock.close()
        self.instance_lock.release()  # every worker has exited: the store is free
        return 0

    def _add_slot(self) -> Slot | None:
        sock = bind_socket(self.host, self.port, self.config.server.backlog)
        if self.port == 0:
            self.port = sock.getsockname()[1]
        # The lowest index no slot holds: retiring slots still own theirs (their
        # region and stats base), so len(self.slots) could hand one out twice.
        used = {s.index for s in self.slots}
        index = next(i for i in range(len(self.slots) + 1) if i not in used)
        if index >= MAX_WORKER_SLOTS:  # only while many retiring slots still drain
            sock.close()
            log.error("no free worker slot (at most %d, retiring ones included): not adding a worker",
                      MAX_WORKER_SLOTS)
            return None
        slot = Slot(index, sock)
        self.slots.append(slot)
        return slot

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)

    def _on_signal(self, signum, frame) -> None:
        self.pending_signals.append(signum)

    def _child_reset(self) -> None:
        """In a fresh child: drop the master's signal plumbing and selector."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        self._wake_r.close()
        self._wake_w.close()
        for other in self._all():
            if other.ctl is not None:
                other.ctl.close()
        self.sel.close()

    def _fork(self, body, keep: Slot | None = None) -> int:
        """Fork a child that runs body() with only its own listening socket
        (keep) and exits with 0, or 1 after printing what went wrong."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                self._child_reset()
                for other in self._all():
                    if other is not keep:
                        other.sock.close()
                body()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid

    def _spawn_extra(self, name: str, fn) -> None:
        def body():
            if self.instance_lock is not None:
                self.instance_lock.forget_in_child()
            fn()

        self.extra_children[self._fork(body)] = name

    def _run_slot(self, slot: Slot, ctl: socket.socket) -> None:
        """In the child: become this slot's worker or the admin process."""
        if slot.kind == "admin":
            from ..admin.server import run_admin

            token = os.environ.get(self.config.admin.token_env) or None
            run_admin(slot.sock, ctl, self.config, self.config_path, self.arena, self.config.keys.store,
                      token.encode() if token else None, os.getppid(), self.stats, loaded_seq=self.loaded_seq)
        else:
            Worker(slot.index, self.config, slot.sock, ctl, arena=self.arena, secret=self.secret,
                   stats=self.stats).run()

    def _repair_key_table(self) -> None:
        """Before an admin process starts: if the last one died inside a key
        write, the core puts that record back as it was, and the store's state
        for the slot is re-applied here (the store commits first, so it may
        hold the change that was being written, such as a revoke)."""
        from .. import core
        from ..admin import keysync
        from ..keys import open_config_store

        idx = self.arena.repair_dead_writer()
        if idx < 0:
            return
        self.arena.set_writer(os.getpid())
        table = core.KeyTable(self.arena, secret=self.secret)
        store = open_config_store(self.config)
        try:
            done = keysync.resync_slot(store, table, idx)
        finally:
            store.close()
        log.warning("the admin process died while writing key slot %d: %s", idx, done)

    def _spawn(self, slot: Slot) -> None:
        if slot.kind == "admin":
            self._repair_key_table()
            # A respawned admin process cannot vouch that its predecessor applied every
            # change it committed (it may have died in between): see snapshot.Snapshotter.
            from ..admin import snapshot

            snapshot.STATE["admin_spawns"] = snapshot.STATE.get("admin_spawns", 0) + 1
        parent, child = socket.socketpair()

        def body():
            parent.close()
            self._run_slot(slot, child)

        pid = self._fork(body, keep=slot)
        child.close()
        if slot.kind == "admin":
            self.arena.set_writer(pid)  # the single writer of the key table from now on
        parent.setblocking(False)
        slot.pid = pid
        slot.ctl = parent
        slot.reader = MessageReader()
        slot.ready = False
        slot.started = time.monotonic()
        self.sel.register(parent, selectors.EVENT_READ, slot)

    # -- main loop --------------------------------------------------------------
    def _loop(self) -> None:
        stop_deadline = None
        while True:
            for key, _ in self.sel.select(timeout=0.5):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                else:
                    self._on_ctl(key.data)
            signals, self.pending_signals = self.pending_signals, []
            for signum in signals:
                if signum == signal.SIGCHLD:
                    self._reap()
                elif signum in (signal.SIGTERM, signal.SIGINT):
                    if not self.stopping:
                        log.info("received %s: draining", signal.Signals(signum).name)
                        self.stopping = True
                        stop_deadline = time.monotonic() + self.config.server.drain_timeout + 5
                        self._signal_all(signal.SIGTERM)
                elif signum == signal.SIGHUP:
                    self.reload()
                elif signum == signal.SIGUSR1:
                    # logrotate habit: reopen log files, in every worker.
                    for slot in self.slots:
                        if slot.pid:
                            try:
                                os.kill(slot.pid, signal.SIGUSR1)
                            except ProcessLookupError:
                                pass
            self._reap()
            self._publish_master()
            now = time.monotonic()
            if self.stopping:
                if not any(s.pid for s in self._all()) and not self.extra_children:
                    log.info("all workers exited; bye")
                    return
                if stop_deadline is not None and now > stop_deadline:
                    log.warning("drain deadline passed: killing remaining workers")
                    self._signal_all(signal.SIGKILL)
                    stop_deadline = None
                continue
            for slot in self._all():
                if slot.pid == 0 and not slot.retiring and now >= slot.respawn_at:
                    self._spawn(slot)
            self._announce()

    def _signal_all(self, sig: int) -> None:
        for slot in self._all():
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass
        for pid in self.extra_children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.extra_children:
                name = self.extra_children.pop(pid)
                if not self.stopping:
                    log.error("%s (pid %d) exited unexpectedly", name, pid)
                continue
            for slot in self._all():
                if slot.pid == pid:
                    self._worker_exited(slot, status)
                    break

    def _worker_exited(self, slot: Slot, status: int) -> None:
        pid = slot.pid
        slot.pid = 0
        slot.ready = False
        if slot.ctl is not None:
            self.sel.unregister(slot.ctl)
            slot.ctl.close()
            slot.ctl = None
        if slot.kind == "worker":
            # Its counts die with it: keep its last published totals so no
            # counter in /metrics goes backwards (also for a retired slot; a
            # slot added later with this index starts from them).
            self.stats.carry(slot.index)
        if slot.retiring:
            slot.sock.close()
            self.slots.remove(slot)
            return
        if self.stopping:
            return
        if os.WIFSIGNALED(status):
            why = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            why = f"exit status {os.WEXITSTATUS(status)}"
        lived = time.monotonic() - slot.started
        slot.restarts += 1
        self.restarts_total += 1
        # A worker that dies at once would otherwise be respawned in a hot loop.
        delay = 0.0 if lived > 2.0 else min(RESTART_BACKOFF_MAX, 0.1 * 2 ** min(slot.restarts, 6))
        slot.respawn_at = time.monotonic() + delay
        name = "admin process" if slot.kind == "admin" else f"worker {slot.index}"
        log.error("%s (pid %d) %s; restarting%s", name, pid, why, f" in {delay:.1f}s" if delay else "")

    def _on_ctl(self, slot: Slot) -> None:
        try:
            data = slot.ctl.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(slot.ctl)
            slot.ctl.close()
            slot.ctl = None
            return
        for kind, payload in slot.reader.feed(data):
            if kind == b"R":
                slot.ready = True
            elif kind == b"L":
                log.debug("worker %d applied config generation %s", slot.index, payload.decode())
            elif kind == b"E":
                log.error("worker %d failed to apply config: %s", slot.index, payload.decode())

    def _announce(self) -> None:
        if self.announced or not all(s.ready for s in self._all() if not s.retiring):
            return
        self.announced = True
        host = f"[{self.host}]" if ":" in self.host else self.host
        n = sum(1 for s in self.slots if not s.retiring)
        lines = [
            f"fastgate: listening on http://{host}:{self.port} with {n} workers (master pid {os.getpid()})",
            f"fastgate: admin API on {self.admin_url}"
            + ("" if os.environ.get(self.config.admin.token_env)
               else f" (disabled: set {self.config.admin.token_env} to enable it)"),
        ]
        # One write, so a reader never sees half a banner.
        sys.stdout.write("\n".join(lines + self.banner_extra) + "\n")
        sys.stdout.flush()

    # -- reload -------------------------------------------------------------------
    def reload(self) -> bool:
        if self.config_path is None:
            log.warning("reload requested but fastgate runs on its embedded default: nothing to reload")
            return False
        try:
            new = apply_overrides(cfg.load_config(self.config_path), self.overrides)
        except ConfigError as exc:
            log.error("reload failed; keeping the running config:\n%s", exc.render())
            return False
        if new.server.listen != self.config.server.listen:
            log.warning("server.listen changed to %s: takes effect on restart only", new.server.listen)
            new = cfg.msgspec.structs.replace(
                new, server=cfg.msgspec.structs.replace(new.server, listen=self.config.server.listen)
            )
        old_n = sum(1 for s in self.slots if not s.retiring)
        self.config = new
        payload = cfg.encode(new)
        for slot in self._all():
            if slot.ctl is not None and not slot.retiring:
                try:
                    send_msg(slot.ctl, b"C", payload)
                except OSError:
                    pass  # the worker is gone; its replacement forks with the new config
        new_n = self.worker_count(new)
        if new_n > old_n:
            for _ in range(new_n - old_n):
                slot = self._add_slot()
                if slot is not None:
                    self._spawn(slot)
        elif new_n < old_n:
            for slot in [s for s in self.slots if not s.retiring][new_n:]:
                slot.retiring = True
                if slot.pid:
                    os.kill(slot.pid, signal.SIGTERM)
            for slot in [s for s in self.slots if s.retiring and not s.pid]:
                slot.sock.close()
                self.slots.remove(slot)
        log.info("config reloaded from %s (%d routes, %d workers)", self.config_path, len(new.routes), new_n)
        return True


def apply_overrides(config: cfg.Config, overrides: dict) -> cfg.Config:
    """CLI flags win over the file (DESIGN: 'flags override the file')."""
    if not overrides:
        return config
    raw = {
        "server": cfg.msgspec.to_builtins(config.server),
        "admin": cfg.msgspec.to_builtins(config.admin),
    }
    if "listen" in overrides:
        raw["server"]["listen"] = overrides["listen"]
    if "workers" in overrides:
        raw["server"]["workers"] = overrides["workers"]
    if "admin_listen" in overrides:
        raw["admin"]["listen"] = overrides["admin_listen"]
    problems: list = []
    server = cfg._convert(raw["server"], cfg.ServerConfig, "$.server", problems)
    admin = cfg._convert(raw["admin"], cfg.AdminConfig, "$.admin", problems)
    if problems:
        raise ConfigError("command line", problems)
    return cfg.msgspec.structs.replace(config, server=server, admin=admin)
