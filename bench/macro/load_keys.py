"""Measures loading N keys (default 1,000,000) from the SQLite key store into the core KeyTable.

Phases, each timed on its own (wall clock and process CPU):

1. import   KeyStore.bulk_import of N records in one transaction (with N 'created' audit events)
2. read     list(KeyStore.iter_all()): every record back from disk as KeyRecord structs
3. table    core.KeyTable(core.Arena.create(key_capacity=N), secret=store.secret):
            allocate() + put() per record (scopes, CIDRs, limits, expiry compiled by the core)
   stream   iter_all() straight into a fresh KeyTable, records not kept: the start-up path
4. slots    KeyStore.set_slots for all N (one transaction; what the admin process persists)
5. verify   KeyStore.verify_audit() over the N-event chain

Records are synthetic: random 16-char ids and random 32-byte digests (what core.key_digest
would produce; generating N real keys with core.make_key is not what is measured). By default
every 3rd key has scopes, every 5th a per-key limit, every 7th an expiry, every 11th CIDRs.

    python bench/macro/load_keys.py                 # 1,000,000 keys
    python bench/macro/load_keys.py -n 100000 --json
    python bench/macro/load_keys.py --store /path/keys.db --keep   # put the db somewhere specific

The store lives in a temporary directory (removed at exit unless --keep).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fastgate import core  # noqa: E402
from fastgate.keys import KeyRecord, KeyStore, ts_to_ms  # noqa: E402


def synth(n: int, plain: bool):
    rnd = os.urandom
    for i in range(n):
        kid = rnd(8).hex()
        kw = {}
        if not plain:
            if i % 3 == 0:
                kw["scopes"] = ["GET /orders/*", "POST /orders"]
            if i % 5 == 0:
                kw["limits"] = ["5/second", "1000/day"]
            if i % 7 == 0:
                kw["expires_at"] = "2099-01-01T00:00:00Z"
            if i % 11 == 0:
                kw["allow_cidrs"] = ["10.0.0.0/8"]
                kw["deny_cidrs"] = ["10.66.0.0/16"]
            if i % 2 == 0:
                kw["owner"] = f"tenant{i % 1000}"
                kw["plan"] = "free"
        yield KeyRecord(id=kid, name=f"key {i}", digest=rnd(32), **kw)


class Phase:
    def __init__(self, name: str, results: dict, quiet: bool):
        self.name, self.results, self.quiet = name, results, quiet

    def __enter__(self):
        gc.collect()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.results[self.name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
        if not self.quiet:
            print(f"  {self.name:<8} {wall:8.2f} s wall {cpu:8.2f} s cpu", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--keys", type=int, default=1_000_000)
    ap.add_argument("--plain", action="store_true", help="records without scopes/limits/CIDRs/expiry")
    ap.add_argument("--ext-per-key", type=int, default=256,
                    help="core extension heap bytes per key (scopes, CIDRs, limits, meta)")
    ap.add_argument("--store", help="database path (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the database")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    n = args.keys
    tmp = None
    if args.store:
        path = args.store
    else:
        tmp = tempfile.mkdtemp(prefix="fg-load-keys-")
        path = os.path.join(tmp, "keys.db")
    quiet = args.json
    res: dict = {}
    try:
        if not quiet:
            print(f"loading {n:,} keys: store {path}, core {core.IMPLEMENTATION}, python {platform.python_version()}")
        store = KeyStore(path)
        try:
            t0 = time.perf_counter()
            records = list(synth(n, args.plain))
            if not quiet:
                print(f"  (generated {n:,} synthetic records in {time.perf_counter() - t0:.2f} s, not counted)")
            with Phase("import", res, quiet):
                store.bulk_import(records, actor="bench")
            del records
            size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
            with Phase("read", res, quiet):
                recs = list(store.iter_all())
            assert len(recs) == n, (len(recs), n)
            arena = core.Arena.create(key_capacity=n, ext_bytes=max(args.ext_per_key * n, 1 << 16))
            table = core.KeyTable(arena, secret=store.secret)
            with Phase("table", res, quiet):
                slots = []
                for r in recs:
                    idx = table.allocate()
                    table.put(idx, r.digest, flags=core.FLAG_REVOKED if r.revoked_at else 0,
                              expires_ms=ts_to_ms(r.expires_at) if r.expires_at else 0,
                              scopes=r.scopes or None, allow_cidrs=r.allow_cidrs or None,
                              deny_cidrs=r.deny_cidrs or None, limits=r.limits or None, meta=r.id.encode())
                    slots.append((r.id, idx))
            assert len(table) == n
            del recs, table, arena
            # what the master does at start: stream the store straight into a fresh table
            arena = core.Arena.create(key_capacity=n, ext_bytes=max(args.ext_per_key * n, 1 << 16))
            table = core.KeyTable(arena, secret=store.secret)
            with Phase("stream", res, quiet):
                for r in store.iter_all():
                    table.put(table.allocate(), r.digest, flags=core.FLAG_REVOKED if r.revoked_at else 0,
                              expires_ms=ts_to_ms(r.expires_at) if r.expires_at else 0,
                              scopes=r.scopes or None, allow_cidrs=r.allow_cidrs or None,
                              deny_cidrs=r.deny_cidrs or None, limits=r.limits or None, meta=r.id.encode())
            assert len(table) == n
            with Phase("slots", res, quiet):
                store.set_slots(slots)
            with Phase("verify", res, quiet):
                ok, problems, rows = store.verify_audit()
            assert ok and rows == n, problems[:3]
        finally:
            store.close()
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary = {
            "keys": n, "plain": args.plain, "core": core.IMPLEMENTATION, "python": platform.python_version(),
            "sqlite": __import__("sqlite3").sqlite_version, "db_bytes": size, "max_rss_mb": round(rss_mb),
            "arena_bytes": arena.size, "phases": res,
            "keys_per_s": {k: round(n / v["wall_s"]) for k, v in res.items() if v["wall_s"] > 0},
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"  db+wal after import {size / 1e6:.0f} MB, arena {arena.size / 1e6:.0f} MB, peak RSS {rss_mb:.0f} MB")
            for k, v in summary["keys_per_s"].items():
                print(f"  {k:<8} {v:>12,} keys/s")
            print(f"  start-up load (stream: read + put in one pass): {res['stream']['wall_s']:.2f} s for {n:,} keys")
        return 0
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
