"""Real upstream servers for integration tests, run as a separate process.

`python tests/upstream_app.py` starts, on 127.0.0.1 port 0:
- an aiohttp application (an independent HTTP implementation, so the gateway is
  not tested against its own parser) with the endpoints below;
- a raw "flaky" server that answers the first request of each connection and
  then drops the connection when a second one arrives (a pooled connection that
  died without the gateway being able to notice).
It prints one line `PORTS <aiohttp> <flaky>` when both are ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

from aiohttp import WSMsgType, web


async def echo(request: web.Request) -> web.Response:
    h = hashlib.sha256()
    n = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        n += len(chunk)
    body = {
        "method": request.method,
        "path": request.raw_path.split("?", 1)[0],
        "query": request.query_string,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_bytes": n,
        "body_sha256": h.hexdigest(),
        "chunked": request.headers.get("Transfer-Encoding", "") == "chunked",
        "version": f"{request.version.major}.{request.version.minor}",
    }
    resp = web.json_response(body)
    # Hop-by-hop and connection-named headers the gateway must strip.
    resp.headers["Connection"] = "keep-alive, X-Hop"
    resp.headers["X-Hop"] = "must-not-reach-client"
    resp.headers["Keep-Alive"] = "timeout=30"
    resp.headers["X-Upstream"] = "yes"
    return resp


async def download(request: web.Request) -> web.StreamResponse:
    """GET /bytes/{n}[?chunked=1]: n bytes of a fixed pattern, streamed."""
    n = int(request.match_info["n"])
    resp = web.StreamResponse()
    resp.content_type = "application/octet-stream"
    if request.query.get("chunked"):
        resp.enable_chunked_encoding()
    else:
        resp.content_length = n
    await resp.prepare(request)
    block = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    while sent < n:
        piece = block[: min(len(block), n - sent)]
        await resp.write(piece)
        sent += len(piece)
    await resp.write_eof()
    return resp


async def sse(request: web.Request) -> web.StreamResponse:
    """GET /sse?n=3&interval=0.3: n events, interval seconds apart."""
    n = int(request.query.get("n", "3"))
    interval = float(request.query.get("interval", "0.3"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for i in range(n):
        await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
        if i + 1 < n:
            await asyncio.sleep(interval)
    await resp.write_eof()
    return resp


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "2")))
    return web.json_response({"slept": True})


async def truncate(request: web.Request) -> web.StreamResponse:
    """Promise 100000 bytes (or chunks), send some, then drop the connection."""
    resp = web.StreamResponse()
    if request.query.get("chunked"):
        resp.enable_chunked_encoding()
    else:
        resp.content_length = 100_000
    await resp.prepare(request)
    await resp.write(b"x" * 1000)
    await asyncio.sleep(0.1)
    request.transport.abort()
    return resp


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, body=None if code in (204, 304) else b"status body")


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


async def flaky_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    served = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if served:
                writer.transport.abort()  # a dead keep-alive connection
                return
            served += 1
            body = json.dumps({"flaky": True, "head_bytes": len(head)}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main() -> None:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/bytes/{n}", download)
    app.router.add_get("/sse", sse)
    app.router.add_route("*", "/slow", slow)
    app.router.add_get("/truncate", truncate)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    flaky = await asyncio.start_server(flaky_handler, "127.0.0.1", 0)
    flaky_port = flaky.sockets[0].getsockname()[1]
    print(f"PORTS {port} {flaky_port}", flush=True)
    # Exit when the test process closes our stdin (no orphan servers).
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
