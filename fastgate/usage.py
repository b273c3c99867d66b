"""Per-key usage rollups in SQLite: one row per key per minute, hour and day.

Written by the admin process only, from the counts workers hand over through
the shared stats segment, so the table grows with keys x time buckets, never
with requests (a row per request is what freezes per-call tables at tens of
millions of rows). Old minute and hour rows are pruned by retention.
"""

from __future__ import annotations

import os
import sqlite3
import time

PERIODS = {"minute": 60, "hour": 3600, "day": 86_400}
COLUMNS = ("c1xx", "c2xx", "c3xx", "c4xx", "c5xx", "bytes_in", "bytes_out")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,
    ts INTEGER NOT NULL,
    c1xx INTEGER NOT NULL DEFAULT 0, c2xx INTEGER NOT NULL DEFAULT 0, c3xx INTEGER NOT NULL DEFAULT 0,
    c4xx INTEGER NOT NULL DEFAULT 0, c5xx INTEGER NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0, bytes_out INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period, ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (period, ts);
"""


def ts_text(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class UsageStore:
    def __init__(self, path: str, retention: dict[str, int] | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # rollups are re-derivable counts, not keys
        self.conn.executescript(_SCHEMA)
        # seconds to keep rows of each period (None = forever)
        self.retention = retention or {"minute": 2 * 86_400, "hour": 90 * 86_400, "day": None}
        self._last_prune = 0.0

    def close(self) -> None:
        self.conn.close()

    def add(self, counts: dict[str, list[int]], now: float | None = None) -> int:
        """Add {key_id: [1xx..5xx, bytes_in, bytes_out]} to the current minute,
        hour and day buckets, in one transaction. Returns rows touched."""
        if not counts:
            return 0
        now = time.time() if now is None else now
        rows = []
        for period, secs in PERIODS.items():
            ts = int(now // secs * secs)
            for key_id, c in counts.items():
                rows.append((key_id, period, ts, *c))
        cols = ", ".join(COLUMNS)
        upd = ", ".join(f"{c} = {c} + excluded.{c}" for c in COLUMNS)
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(
                f"INSERT INTO usage (key_id, period, ts, {cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (key_id, period, ts) DO UPDATE SET {upd}",
                rows,
            )
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        if now - self._last_prune > 60:
            self.prune(now)
        return len(rows)

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._last_prune = now
        for period, keep in self.retention.items():
            if keep:
                self.conn.execute("DELETE FROM usage WHERE period = ? AND ts < ?", (period, int(now - keep)))

    def series(self, key_id: str, by: str = "hour", limit: int = 48) -> list[dict]:
        cur = self.conn.execute(
            f"SELECT ts, {', '.join(COLUMNS)} FROM usage WHERE key_id = ? AND period = ? ORDER BY ts DESC LIMIT ?",
            (key_id, by, limit),
        )
        out = []
        for ts, *c in cur.fetchall():
            row = {"ts": ts_text(ts), "requests": sum(c[:5])}
            row.update({name.lstrip("c") if name.startswith("c") and name[1].isdigit() else name: v
                        for name, v in zip(COLUMNS, c)})
            out.append(row)
        out.reverse()
        return out

    def top(self, n: int = 10, by: str = "day", since: float | None = None) -> list[dict]:
        """Top consumers by requests over the buckets of `by` since `since`
        (default: the current bucket)."""
        secs = PERIODS[by]
        now = time.time()
        since = int(now // secs * secs) if since is None else int(since)
        cur = self.conn.execute(
            f"SELECT key_id, SUM(c1xx + c2xx + c3xx + c4xx + c5xx) AS r, "
            f"{', '.join(f'SUM({c})' for c in COLUMNS)} FROM usage WHERE period = ? AND ts >= ? "
            "GROUP BY key_id ORDER BY r DESC, key_id LIMIT ?",
            (by, since, n),
        )
        out = []
        for key_id, r, *c in cur.fetchall():
            row = {"key_id": key_id, "requests": r, "since": ts_text(since)}
            row.update({name.lstrip("c") if name.startswith("c") and name[1].isdigit() else name: v
                        for name, v in zip(COLUMNS, c)})
            out.append(row)
        return out
