"""The built-in load generator, for machines without wrk: asyncio (uvloop when installed) over
raw sockets, N keep-alive connections, a fixed duration, per-request latency percentiles.

    python -m bench.loadgen --port 8080 --path /svc0/ --keys-file keys.txt -c 50 -d 10

Each connection sends one request, waits for the whole response (parsed by httptools), then
sends the next, cycling over the keys in ``--keys-file`` (one per line; sent as x-api-key).
Prints one JSON object: requests, seconds, rps, p50_ms, p99_ms, p999_ms, errors. Slower than
wrk (one Python process; it saturates around 10-20k requests/s per core), so against a fast
gateway its requests/s is a floor; CPU µs/request on the gateway side stays comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httptools


class _Response:
    """httptools callbacks for one connection: a message is complete -> wake the sender."""

    def __init__(self):
        self.done = False

    def on_message_complete(self):
        self.done = True


async def _connection(port: int, reqs: list[bytes], start: int, deadline: float, lat: list[float],
                      errors: dict) -> None:
    i = start
    now = time.perf_counter
    while now() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, asyncio.TimeoutError):
            errors["connect"] = errors.get("connect", 0) + 1
            await asyncio.sleep(0.05)
            continue
        state = _Response()
        parser = httptools.HttpResponseParser(state)
        try:
            while now() < deadline:
                req = reqs[i % len(reqs)]
                i += 1
                state.done = False
                t0 = now()
                writer.write(req)
                while not state.done:
                    data = await asyncio.wait_for(reader.read(65536), max(deadline - now(), 0) + 5)
                    if not data:
                        raise ConnectionResetError("closed by peer")
                    parser.feed_data(data)
                lat.append(now() - t0)
                status = parser.get_status_code()
                if not 200 <= status < 400:
                    errors["non_2xx"] = errors.get("non_2xx", 0) + 1
                if not parser.should_keep_alive():
                    break
        except asyncio.TimeoutError:
            errors["timeout"] = errors.get("timeout", 0) + 1
        except (OSError, httptools.HttpParserError) as exc:
            if now() < deadline:
                errors["read"] = errors.get("read", 0) + 1
                del exc
        finally:
            writer.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


async def run(port: int, path: str, keys: list[str], connections: int, duration: float) -> dict:
    reqs = [(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-api-key: {k}\r\n\r\n").encode() for k in keys]
    lat: list[float] = []
    errors: dict = {}
    t0 = time.perf_counter()
    deadline = t0 + duration
    await asyncio.gather(*(_connection(port, reqs, c * 7919, deadline, lat, errors) for c in range(connections)))
    seconds = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat), "seconds": seconds, "rps": len(lat) / seconds,
        "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
        "p999_ms": percentile(lat, 99.9) * 1e3, "errors": errors,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--keys-file", help="keys to cycle over, one per line (default: one dummy key)")
    p.add_argument("-c", "--connections", type=int, default=50)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    args = p.parse_args(argv)
    keys = ["none"]
    if args.keys_file:
        with open(args.keys_file) as f:
            keys = [line.strip() for line in f if line.strip()] or keys
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    out = runner(run(args.port, args.path, keys, args.connections, args.duration))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
