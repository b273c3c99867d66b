"""Cluster fan-out: every key change made on any node reaches every node's shared memory,
and a cluster write answers once every live node has acknowledged it.

Runs in each node's admin process (the single writer of its shared key table), only in
cluster mode (``[cluster] store`` = PostgreSQL); a single node on SQLite never imports it.

Change numbers. Every key change appends one audit event under the chain-head lock, so the
audit seq is a gap-free change number in commit order (fastgate.keys.store_pg). A node keeps
``applied``: every change up to it is in its shared memory.

Transport: PostgreSQL LISTEN/NOTIFY, not Redis pub/sub. A trigger on the chain head sends
``NOTIFY fastgate_changes, '<seq>'`` inside the writing transaction, and PostgreSQL delivers
it on COMMIT only, in commit order, never for a rollback: a node cannot hear of a change it
cannot read yet, and a change cannot commit without its notification being queued. Redis
pub/sub would be a second server on the write path, published after the commit by the
writer (a writer that dies between COMMIT and PUBLISH loses the message) and at-most-once
anyway. A notification is only a wake-up, never the data: on one, a node reads
``changes_since(applied)`` from the store and applies each changed key's *current* record
(re-applying is harmless), so a notification that is lost (the listening connection broke),
coalesced or reordered can never lose an update. A poll every HEARTBEAT seconds (the store's
change number comes back with the heartbeat) is the safety net.

Nodes and acks. Table ``nodes``: one row per node with its ``applied_seq`` and a heartbeat
(``heartbeat_at``, the server's clock, so node clocks never matter), written every HEARTBEAT
seconds and after every catch-up; a change of ``applied_seq`` sends ``NOTIFY fastgate_acks,
'<seq> <node_id>'`` (a trigger). A node is *live* if it beat within LIVE_WINDOW seconds, and
*known* if within FORGET_AFTER; a node that stops cleanly deletes its row. A write of a
change S (revoke, rotate, update, delete) answers when every live node has applied >= S, or
after ``[cluster] ack_timeout``: ``acked`` lists the nodes that have (this node counts at
once: its shared memory has the change before the store call returns), ``missing`` the live
ones that did not in time plus the known ones that are not live (killed, partitioned: they
are not waited for). A node listed missing gets ``missed_seq = S`` in its row, and reports
unready ("lagging") until it has applied S.

Readiness (``/readyz``): 503 "starting" until the node has caught up from the change number
its shared memory was loaded at (or, for a respawned admin process, from its row's), and
after re-opening a lost listening connection until it has caught up again; 503 "lagging"
while a writer saw it miss an ack it has not caught up with, or while a changed record does
not fit in its shared memory (that key is refused here meanwhile: fail closed). With the
store unreachable the node stays ready and serves from shared memory (body: ``"store":
"unreachable"``): no node can write then, and the alternative would take every node out of
its load balancer at once. A node cut off from the store while others reach it is listed
in every write's ``missing``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec

from . import core
from .admin import keysync
from .keys.store import StoreError

log = logging.getLogger("fastgate.cluster")

CHANGES = "fastgate_changes"
ACKS = "fastgate_acks"
HEARTBEAT = 1.0  # seconds between heartbeats (and safety-net polls)
LIVE_WINDOW = 3.0  # a node is live if it beat within this many seconds
FORGET_AFTER = 600.0  # a node that has not beat for this long is no longer listed as missing
BATCH = 1000  # changes read per query while catching up
POLL_SLICE = 0.2  # while waiting for acks: re-read the nodes table this often (lost notifications)


class AckPending:
    """An answer that waits for the cluster's acks of change ``seq`` (AdminProtocol awaits
    ``resolve()``); ``out`` is the answer without them (a Struct with acked/missing fields)."""

    __slots__ = ("fanout", "seq", "out")

    def __init__(self, fanout: "Fanout", seq: int, out: Any):
        self.fanout = fanout
        self.seq = seq
        self.out = out

    async def resolve(self) -> Any:
        acked, missing = await self.fanout.acks(self.seq)
        return msgspec.structs.replace(self.out, acked=acked, missing=missing)


class Fanout:
    """One node's side of the fan-out (see the module docstring). Not thread-safe: it runs
    on the admin process's event loop, between whose callbacks no store call is in flight."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop, node_id: str, ack_timeout: float,
                 loaded_seq: int = 0):
        self.app = app
        self.store = app.store
        self.keys = app.keys
        self.loop = loop
        self.node_id = node_id
        self.ack_timeout = ack_timeout
        self.loaded_seq = loaded_seq
        self.applied = loaded_seq
        self.head = loaded_seq  # the store's change number, as last seen
        self.caught_up = False
        self.missed_seq = 0
        self.peers_live = 0
        self.store_ok = True
        self.ack_timeouts = 0  # writes whose acks did not all come within ack_timeout
        self.conn: Any = None  # the LISTEN connection
        self._fd = -1
        self.peer_applied: dict[str, int] = {}
        self.known: list[str] = []  # other nodes from the last nodes read (for a write while the store is down)
        self.unfit: set[str] = set()  # key ids whose record did not fit in shared memory
        self.id_slot = {kid: slot for slot, kid in app.slot_ids.items()}
        self._waiters: list[asyncio.Future] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Listen, register, catch up (before the admin process reports ready); a store that
        cannot be reached now is retried every HEARTBEAT (readyz says "starting" meanwhile)."""
        try:
            self._listen()
            self.applied = self.store.node_join(self.node_id, self.applied)
            self.catch_up()
        except StoreError as exc:
            self._store_failed(exc)
        self._timer = self.loop.call_later(HEARTBEAT, self._tick)

    def close(self, leave: bool = True) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._drop_listener()
        if leave:
            try:
                self.store.node_leave(self.node_id)
            except StoreError:
                pass  # its row ages out: writers stop waiting for it after LIVE_WINDOW

    def _listen(self) -> None:
        # LISTEN before reading changes: a change committed in between is both read and
        # notified (applied twice, harmless), never neither.
        self.conn = self.store.listen(CHANGES, ACKS)
        self._fd = self.conn.fileno()  # kept: a lost connection no longer tells its socket
        self.loop.add_reader(self._fd, self._on_notify)

    def _drop_listener(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            self.loop.remove_reader(self._fd)  # before close: the number may be reused at once
        except (ValueError, OSError):
            pass
        try:
            conn.close()
        except Exception:  # noqa: BLE001  (closing a broken connection)
            pass

    def _store_failed(self, exc: BaseException) -> None:
        if self.store_ok:
            log.error("cluster: the store cannot be reached (%s); serving from shared memory, catching up when "
                      "it is back", exc)
        self.store_ok = False

    def _tick(self) -> None:
        if self._closed:
            return
        try:
            if self.conn is None:
                self._listen()
                self.caught_up = False  # re-listening: whatever was notified meanwhile is read now
            self.catch_up()
            if not self.store_ok:
                log.warning("cluster: the store is reachable again; caught up to change %d", self.applied)
                self.store_ok = True
        except StoreError as exc:
            self._store_failed(exc)
        except Exception:
            log.exception("cluster: fan-out tick failed")
        self._timer = self.loop.call_later(HEARTBEAT, self._tick)

    # ------------------------------------------------------------ notifications

    def _on_notify(self) -> None:
        conn = self.conn
        if conn is None:
            return
        pg = conn.pgconn
        try:
            pg.consume_input()
        except Exception as exc:  # noqa: BLE001  (psycopg: the connection broke)
            log.warning("cluster: the listening connection to the store broke (%s); re-opening it", exc)
            self._drop_listener()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(0.1, self._tick)
            return
        changed = acked = False
        while (n := pg.notifies()) is not None:
            payload = n.extra.decode("utf-8", "replace")
            if n.relname == CHANGES.encode():
                if payload.isdigit() and int(payload) > self.applied:
                    self.head = max(self.head, int(payload))
                    changed = True
            elif n.relname == ACKS.encode():
                seq, _, node = payload.partition(" ")
                if seq.isdigit() and node != self.node_id:
                    self.peer_applied[node] = max(self.peer_applied.get(node, 0), int(seq))
                    acked = True
        if acked:
            self._wake()
        if changed:
            try:
                self.catch_up()
            except StoreError as exc:
                self._store_failed(exc)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    # ------------------------------------------------------------ applying changes

    def catch_up(self) -> None:
        """Apply every change after ``applied`` (each changed key's current record), then
        heartbeat with the new number (the ack). StoreError when the store cannot be read."""
        while True:
            changes = self.store.changes_since(self.applied, limit=BATCH)
            if not changes:
                break
            for key_id in dict.fromkeys(k for _, k in changes):
                self.apply_key(key_id)
            self.applied = changes[-1][0]  # only after the whole batch is in shared memory
            if len(changes) < BATCH:
                break
        for key_id in list(self.unfit):
            self.apply_key(key_id)
        self.caught_up = True
        self._beat()

    def _beat(self) -> None:
        missed, head, live = self.store.node_beat(self.node_id, self.applied, LIVE_WINDOW)
        if missed is None:  # our row was deleted (by hand, or a clean stop of a node with our id)
            self.applied = self.store.node_join(self.node_id, self.applied)
            missed = 0
        self.missed_seq, self.peers_live = missed, live
        self.head = max(self.head, head)

    def apply_key(self, key_id: str) -> None:
        """Make this node's shared memory hold what the store holds for ``key_id`` now."""
        rec = self.store.get(key_id)
        if rec is None:
            self.forget(key_id)
            return
        try:
            self.apply_record(rec)
        except core.CoreError as exc:
            slot = self.id_slot.get(key_id)
            if slot is not None and self.app.slot_ids.get(slot) == key_id:
                self.keys.revoke(slot)  # fail closed: its old record must not keep working here
            if key_id not in self.unfit:
                log.error("cluster: key %s changed but does not fit in this node's shared memory (%s); it is "
                          "refused here until it does (raise [keys] capacity or ext_bytes)", key_id, exc)
            self.unfit.add(key_id)
            return
        self.unfit.discard(key_id)

    def apply_record(self, rec: Any) -> None:
        """Put a stored record into shared memory; a key without a slot on this node (made on
        another node) gets one, recorded in the store. CoreError if it does not fit."""
        slot = rec.slot if rec.slot >= 0 else self.id_slot.get(rec.id)
        new = slot is None
        if new:
            slot = self.keys.allocate()
        rec.slot = slot
        keysync.apply(self.keys, rec)
        self.app.slot_ids[slot] = rec.id
        self.id_slot[rec.id] = slot
        if new:
            try:
                self.store.set_slot(rec.id, slot)
            except StoreError as exc:  # id_slot remembers it; the next start re-assigns slots anyway
                log.warning("cluster: could not record slot %d of key %s: %s", slot, rec.id, exc)

    def noted(self, rec: Any) -> None:
        """This node wrote ``rec`` into its own shared memory (a create here)."""
        if rec.slot >= 0:
            self.id_slot[rec.id] = rec.slot

    def forget(self, key_id: str) -> None:
        """The key is gone from the store: take it out of shared memory, unless its slot has
        meanwhile been given to another key."""
        slot = self.id_slot.pop(key_id, None)
        self.unfit.discard(key_id)
        if slot is not None and self.app.slot_ids.get(slot, key_id) == key_id:
            self.app.rollup()  # counts still queued for this slot belong to this key
            self.keys.delete(slot)
            self.app.slot_ids.pop(slot, None)

    # ------------------------------------------------------------ acks

    def pending(self, out: Any, seq: int | None = None) -> AckPending:
        """The answer of the write just made (its change number: the store's last_write_seq)."""
        return AckPending(self, self.store.last_write_seq if seq is None else seq, out)

    def _read_nodes(self) -> list[tuple[str, int, bool]]:
        nodes = [n for n in self.store.cluster_nodes(LIVE_WINDOW, FORGET_AFTER) if n[0] != self.node_id]
        for node, applied, _ in nodes:
            if applied > self.peer_applied.get(node, 0):
                self.peer_applied[node] = applied
        self.known = [n[0] for n in nodes]
        return nodes

    async def acks(self, seq: int) -> tuple[list[str], list[str]]:
        """(acked, missing) for change ``seq``: waits up to ack_timeout for every live node."""
        deadline = self.loop.time() + self.ack_timeout
        try:
            nodes = self._read_nodes()
        except StoreError as exc:  # committed, but who has it cannot be known now
            self._store_failed(exc)
            return [self.node_id], sorted(self.known)
        live = {n for n, _, is_live in nodes if is_live}
        others = {n for n, _, is_live in nodes if not is_live}
        behind = {n for n in live if self.peer_applied.get(n, 0) < seq}
        while behind:
            left = deadline - self.loop.time()
            if left <= 0:
                break
            fut = self.loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, min(left, POLL_SLICE))
            except asyncio.TimeoutError:
                self._waiters = [f for f in self._waiters if not f.done()]
                try:
                    self._read_nodes()  # an ack whose notification did not come (a reconnecting listener)
                except StoreError:
                    pass
            behind = {n for n in behind if self.peer_applied.get(n, 0) < seq}
        missing = sorted(behind | {n for n in others if self.peer_applied.get(n, 0) < seq})
        if behind:
            self.ack_timeouts += 1
        if missing:
            log.warning("cluster: change %d not acknowledged by %s within %.1fs", seq, ", ".join(missing),
                        self.ack_timeout)
            try:
                self.store.nodes_missed(missing, seq)
            except StoreError:
                pass
        acked = sorted(({self.node_id} | live | others) - set(missing))
        return acked, missing

    # ------------------------------------------------------------ readiness and metrics

    def unready(self) -> tuple[str, str] | None:
        """(status, reason) while this node must not report ready, else None."""
        if not self.caught_up:
            return "starting", (f"catching up on key changes (applied {self.applied}, store at {self.head})"
                                if self.store_ok else "the key store cannot be reached yet to catch up")
        if self.unfit:
            return "lagging", f"{len(self.unfit)} changed key(s) do not fit in shared memory"
        if self.missed_seq > self.applied:
            return "lagging", (f"missed the ack of change {self.missed_seq} (applied {self.applied}); "
                               "ready again once caught up")
        return None

    def state(self) -> dict:
        return {"node_id": self.node_id, "applied_seq": self.applied, "store_seq": max(self.head, self.applied),
                "peers_live": self.peers_live, "store": "ok" if self.store_ok else "unreachable"}

    def metrics(self) -> str:
        lag = max(0, self.head - self.applied)
        rows = [
            ("fastgate_cluster_fanout_lag", "gauge",
             "Key changes in the store not yet applied to this node's shared memory.", lag),
            ("fastgate_cluster_applied_seq", "gauge", "The change number this node's shared memory has applied.",
             self.applied),
            ("fastgate_cluster_ack_timeouts_total", "counter",
             "Cluster writes answered before every live node acknowledged (ack_timeout passed).", self.ack_timeouts),
            ("fastgate_cluster_peers_live", "gauge", "Other nodes with a heartbeat within the live window.",
             self.peers_live),
            ("fastgate_cluster_ready", "gauge", "1 while this node is caught up (see /readyz).",
             int(self.unready() is None)),
            ("fastgate_cluster_store_up", "gauge", "1 while this node reaches the cluster store.", int(self.store_ok)),
        ]
        out = []
        for name, kind, help_, value in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"

