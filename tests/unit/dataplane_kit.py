"""The data plane without sockets: bytes in, through fake transports, bytes out.

A ``Gateway`` is one real ``Worker`` (config from a TOML string, a private
arena) driven on a real event loop (uvloop, or plain asyncio) through the
asyncio protocol interface only:

- client side: ``ClientConnection(worker)`` gets a ``FakeTransport`` whose
  writes are what the client would read (``Client.responses()`` parses them
  with the independent response parser below);
- upstream side: ``worker.loop`` is the real loop behind a thin facade whose
  ``create_connection`` builds the upstream protocol on a ``FakeTransport``
  (what it is written is what the upstream received) and whose ``time()`` is a
  clock the test moves (``Gateway.advance`` then runs ``worker._tick``).

Nothing here reads or writes the fields of the data plane's objects
(Exchange, ClientConnection, UpstreamConn): only protocol calls go in, and
only transport calls come out, as aiohttp tests its parsers with bytes.

Every step runs inside the loop and then lets it run until nothing more
happens (bounded), so connects, scheduled upstream answers and the close
callbacks have all run when a step returns.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tomllib
from dataclasses import dataclass, field

import httptools
import uvloop

from fastgate import core
from fastgate._http import ClientConnection
from fastgate.admin import keysync
from fastgate.config import build_config
from fastgate.keys.store import KeyRecord
from fastgate.workers.worker import Worker

SECRET = b"k" * 32
UPSTREAM = "10.9.9.9:8080"  # never dialled: the fake upstream answers for it
SETTLE_LIMIT = 20_000  # loop iterations a single step may take (a hang fails, it never spins)

# A gateway with the routes most tests need; a test adds its own TOML after it.
BASE = f"""
[server]
header_timeout = 10.0
body_timeout = 30.0
keepalive_timeout = 60.0
max_body_bytes = "100m"
request_buffer = "64k"

[keys]
failed_auth_limit = "off"

[plans.gold]
limits = ["2/minute"]

[[upstreams]]
name = "u"
targets = ["{UPSTREAM}"]
connect_timeout = 2.0
read_timeout = 5.0
idle_timeout = 30.0

[[routes]]
name = "keyed"
path = "/k"
upstream = "u"
auth = "key"
methods = ["GET", "POST", "HEAD"]
max_body_bytes = 100

[[routes]]
name = "open"
path = "/"
upstream = "u"
auth = "none"
"""


# -- transports ---------------------------------------------------------------------------


class FakeSocket:
    """What get_extra_info('socket') hands out: records socket options (an
    SO_LINGER of 0 before abort() is how the data plane sends a TCP RST)."""

    def __init__(self):
        self.options: list[tuple[int, int, bytes]] = []

    def setsockopt(self, level, opt, value):
        self.options.append((level, opt, value))

    @property
    def linger_zero(self) -> bool:
        return any(opt == socket.SO_LINGER and value[:4] == b"\x01\x00\x00\x00"
                   for _, opt, value in self.options)


class FakeTransport:
    """An asyncio transport that keeps what is written and how it ended.

    Like a real one, close()/abort() call the protocol's connection_lost soon
    after (on the loop), once. ``ended`` is "" while open, then "fin" (close),
    "eof" (write_eof: a half-close, the lingering close), "abort" or "rst"
    (abort after SO_LINGER 0)."""

    def __init__(self, gw: "Gateway", protocol=None, peer=("127.0.0.1", 40000), sockname=("127.0.0.1", 8080)):
        self.gw = gw
        self.protocol = protocol
        self.peer = peer
        self.sockname = sockname
        self.sock = FakeSocket()
        self.data = bytearray()
        self.writes = 0
        self.ended = ""
        self.eof = False
        self.reading = True
        self.read_pauses = 0
        self.write_limits = None
        self.late_writes = 0  # writes after close/abort/write_eof: the data plane must never do that
        self.on_write = None
        self._lost = False

    # writing
    def write(self, data) -> None:
        if self.ended:
            self.late_writes += 1
            return
        self.data += data
        self.writes += 1
        self.gw.activity += 1
        if self.on_write is not None:
            self.on_write()

    def writelines(self, parts) -> None:
        if self.ended:
            self.late_writes += 1
            return
        for p in parts:
            self.data += p
        self.writes += 1
        self.gw.activity += 1
        if self.on_write is not None:
            self.on_write()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True
        if not self.ended:
            self.ended = "eof"
        self.gw.activity += 1

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.write_limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    # reading
    def pause_reading(self) -> None:
        self.reading = False
        self.read_pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    # ending
    def is_closing(self) -> bool:
        return self.ended in ("fin", "abort", "rst")

    def close(self) -> None:
        if self.ended in ("", "eof"):
            self.ended = "fin"
        self._lose()

    def abort(self) -> None:
        if self.ended in ("", "eof", "fin") and not self._lost:
            self.ended = "rst" if self.sock.linger_zero else "abort"
        self._lose()

    def _lose(self) -> None:
        self.gw.activity += 1
        if not self._lost and self.protocol is not None:
            self._lost = True
            self.gw.loop.call_soon(self.gw._call, self.protocol.connection_lost, None)

    def get_extra_info(self, name, default=None):
        return {"peername": self.peer, "sockname": self.sockname, "socket": self.sock}.get(name, default)


# -- the upstream -------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the upstream parsed it (httptools)."""

    method: str
    url: str
    headers: list
    body: bytes

    def header(self, name: str):
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return vals[0] if vals else None


class _RequestSink:
    def __init__(self, link: "UpLink"):
        self.link = link
        self.url = b""
        self.headers: list = []
        self.body = b""

    def on_message_begin(self):
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        req = Request(self.link.parser.get_method().decode(), self.url.decode("latin-1"), self.headers, self.body)
        self.link.requests.append(req)
        self.link.gw.upstream.on_request(self.link, req)


class UpLink:
    """One upstream connection the gateway opened: what it received, and the
    calls to answer on it (each runs inside the loop, then settles)."""

    def __init__(self, gw: "Gateway", protocol, host: str, port: int):
        self.gw = gw
        self.protocol = protocol
        self.host, self.port = host, port
        self.transport = FakeTransport(gw, protocol, peer=(host, port), sockname=("10.0.0.2", 50000))
        self.requests: list[Request] = []
        self.parser = httptools.HttpRequestParser(_RequestSink(self))
        self.parse_error = None
        self._seen = 0
        # parsed as it arrives; an answer is only scheduled (call_soon), never
        # delivered inside the gateway's own write
        self.transport.on_write = self._parse_new

    @property
    def received(self) -> bytes:
        return bytes(self.transport.data)

    def _parse_new(self) -> None:
        data = self.transport.data
        if self._seen < len(data) and self.parse_error is None:
            chunk = bytes(data[self._seen:])
            self._seen = len(data)
            try:
                self.parser.feed_data(chunk)
            except httptools.HttpParserError as exc:
                self.parse_error = exc

    def reply(self, data: bytes) -> None:
        """The upstream sends these bytes."""
        self.gw.run(lambda: self.protocol.data_received(data))

    def close(self) -> None:
        """The upstream closes its end (an orderly FIN the gateway sees as EOF)."""

        def lost():
            if not self.transport._lost:
                self.transport._lost = True
                self.transport.ended = self.transport.ended or "peer"
                self.protocol.eof_received()
                self.protocol.connection_lost(None)

        self.gw.run(lost)

    def pause_writing(self) -> None:
        self.gw.run(self.protocol.pause_writing)

    def resume_writing(self) -> None:
        self.gw.run(self.protocol.resume_writing)


def echo(link: UpLink, req: Request) -> bytes:
    """The default answer: 200 with a JSON echo of what arrived (a HEAD gets
    the head only, with the length a GET would have had)."""
    body = json.dumps({
        "method": req.method, "url": req.url, "headers": [list(h) for h in req.headers],
        "body": req.body.decode("latin-1"), "rid": req.header("x-request-id"),
    }).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    return head if req.method == "HEAD" else head + body


class FakeUpstream:
    """Stands in for loop.create_connection. ``respond(link, request) -> bytes
    | None`` answers each complete request on the next loop iteration (None:
    the test answers by hand with UpLink.reply); ``fail`` makes connects raise
    it; ``hang`` makes connects wait until cancelled (the connect timeout)."""

    def __init__(self, gw: "Gateway"):
        self.gw = gw
        self.links: list[UpLink] = []
        self.connects = 0
        self.respond = echo
        self.fail: BaseException | None = None
        self.hang = False
        self.hung: list[asyncio.Future] = []

    async def create_connection(self, factory, host=None, port=None, **kw):
        self.connects += 1
        self.gw.activity += 1
        if self.fail is not None:
            raise self.fail
        if self.hang:
            fut = self.gw.loop.create_future()
            self.hung.append(fut)
            await fut
        protocol = factory()
        link = UpLink(self.gw, protocol, host, port)
        self.links.append(link)
        protocol.connection_made(link.transport)
        return link.transport, protocol

    def on_request(self, link: UpLink, req: Request) -> None:
        if self.respond is None:
            return
        answer = self.respond(link, req)
        if answer is not None:
            self.gw.activity += 1
            self.gw.loop.call_soon(self._deliver, link, answer)

    def _deliver(self, link: UpLink, data: bytes) -> None:
        self.gw.activity += 1
        if not link.transport.ended and not link.transport._lost:
            self.gw._call(link.protocol.data_received, data)

    def close_all(self) -> None:
        """The upstream closes every connection still open (pooled ones too)."""
        for link in self.links:
            if not link.transport._lost:
                link.close()

    @property
    def requests(self) -> list[Request]:
        return [r for link in self.links for r in link.requests]

    @property
    def received(self) -> bytes:
        """Every byte every upstream connection received."""
        return b"".join(link.received for link in self.links)

    def saw(self, needle: bytes | str) -> bool:
        if isinstance(needle, str):
            needle = needle.encode()
        return needle in self.received


# -- the loop the worker sees ---------------------------------------------------------------


class LoopFacade:
    """The real loop, except for the two things a test controls: time() is a
    clock moved by Gateway.advance, create_connection is the fake upstream.
    Timers the worker arms on it (its _tick rearming itself, drain) are kept
    and never fire on their own: the test drives time."""

    def __init__(self, loop, upstream: FakeUpstream, start: float):
        self._loop = loop
        self.upstream = upstream
        self.clock = start
        self.timers: list = []

    def time(self) -> float:
        return self.clock

    def create_connection(self, factory, host=None, port=None, **kw):
        return self.upstream.create_connection(factory, host, port, **kw)

    def call_at(self, when, cb, *args):
        self.timers.append((when, cb, args))

    def call_later(self, delay, cb, *args):
        self.timers.append((self.clock + delay, cb, args))

    def stop(self) -> None:
        self.timers.append(("stop", None, ()))

    def __getattr__(self, name):
        return getattr(self._loop, name)


# -- the client side ------------------------------------------------------------------------


class Client:
    """One client connection: send bytes, read what the gateway wrote."""

    def __init__(self, gw: "Gateway", peer: str, port: int):
        self.gw = gw
        self.conn = ClientConnection(gw.worker)
        self.transport = FakeTransport(gw, self.conn, peer=(peer, port))
        gw.run(lambda: self.conn.connection_made(self.transport))

    def send(self, data: bytes, cuts=()) -> "Client":
        """Deliver data in one read, or cut at these offsets into several."""
        prev = 0
        for cut in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
            piece = data[prev:cut]
            prev = cut
            if not piece or self.transport._lost:
                continue
            self.gw.run(lambda p=piece: self.conn.data_received(p))
        return self

    def feed_bytewise(self, data: bytes) -> "Client":
        return self.send(data, range(1, len(data)))

    def hang_up(self) -> None:
        """The client goes away."""

        def lost():
            if not self.transport._lost:
                self.transport._lost = True
                self.transport.ended = self.transport.ended or "peer"
                self.conn.connection_lost(None)

        self.gw.run(lost)

    def pause_writing(self) -> None:
        self.gw.run(self.conn.pause_writing)

    def resume_writing(self) -> None:
        self.gw.run(self.conn.resume_writing)

    @property
    def out(self) -> bytes:
        return bytes(self.transport.data)

    @property
    def closed(self) -> bool:
        """The gateway ended the connection (closed, half-closed or aborted)."""
        return self.transport.ended not in ("", "peer")

    def responses(self, methods=None) -> list["Response"]:
        """Every complete response written so far (methods: those of the
        requests in order, so the responses to HEAD are read without a body)."""
        got, rest = parse_responses(self.out, methods, eof=self.closed)
        return got

    def response(self, method: str = "GET") -> "Response":
        got = self.responses([method])
        assert len(got) == 1, f"expected one response, got {len(got)}: {self.out!r}"
        return got[0]


# -- the gateway ---------------------------------------------------------------------------------


class Gateway:
    """A Worker on a real loop, with a fake upstream and a test-driven clock."""

    def __init__(self, toml: str = BASE, *, loop: str = "uvloop", arena=None, max_connections=None):
        self.loop = uvloop.new_event_loop() if loop == "uvloop" else asyncio.new_event_loop()
        self.activity = 0
        self.errors: list[BaseException] = []
        self.upstream = FakeUpstream(self)
        self.config = build_config(tomllib.loads(toml), "test.toml")
        self.worker = Worker(index=0, config=self.config, sock=None, ctl=None, arena=arena, secret=SECRET)
        self.clock = LoopFacade(self.loop, self.upstream, 1000.0)
        self.worker.loop = self.clock
        self.worker.now = self.clock.time()
        self.clients: list[Client] = []
        self.key_records: dict[str, KeyRecord] = {}
        self._ports = iter(range(40000, 60000))

    # driving
    def _call(self, fn, *args):
        try:
            fn(*args)
        except BaseException as exc:  # a protocol method raised: the test fails at the end of the step
            self.errors.append(exc)

    def run(self, fn):
        """Call fn inside the running loop, then run the loop until it is quiet."""

        async def step():
            fn()
            await self._settle()

        self.loop.run_until_complete(step())
        if self.errors:
            exc, self.errors = self.errors[0], []
            raise exc

    async def _settle(self):
        quiet = 0
        last = self.activity
        for _ in range(SETTLE_LIMIT):
            await asyncio.sleep(0)
            if self.activity == last:
                quiet += 1
                if quiet >= 4:
                    return
            else:
                quiet = 0
                last = self.activity
        raise AssertionError("the data plane did not settle")

    def advance(self, seconds: float) -> None:
        """Move the clock and run the worker's timer sweep."""
        self.clock.clock += seconds
        self.run(self.worker._tick)

    # parts
    def client(self, peer: str = "127.0.0.1") -> Client:
        c = Client(self, peer, next(self._ports))
        self.clients.append(c)
        return c

    def request(self, data: bytes, peer: str = "127.0.0.1", method: str = "GET") -> "Response":
        """One request on a fresh connection, and its one response."""
        return self.client(peer).send(data).response(method)

    def add_key(self, key_id: str = "k1", *, plan=None, scopes=(), allow_cidrs=(), deny_cidrs=(), limits=(),
                expires_at=None, revoked=False) -> str:
        """A key put into the worker's key table the way the admin process
        puts one (keysync.apply of a store record). Returns the key."""
        key = core.make_key(key_id)
        keys = self.worker.keys
        rec = KeyRecord(id=key_id, name=key_id, owner="acme", plan=plan, scopes=list(scopes),
                        allow_cidrs=list(allow_cidrs), deny_cidrs=list(deny_cidrs), limits=list(limits),
                        expires_at=expires_at, revoked_at="2020-01-01T00:00:00Z" if revoked else None,
                        slot=keys.allocate(), digest=keys.digest(key.encode()))
        keysync.apply(keys, rec)
        self.key_records[key_id] = rec
        return key

    def decisions(self) -> dict:
        """The worker's request counter: {(route, status class, decision): n}."""
        out: dict = {}
        for route, cls, decision, _plan, n in self.worker.meter.requests():
            out[(route, cls, decision)] = out.get((route, cls, decision), 0) + n
        return out

    def close(self) -> None:
        try:
            for fut in self.upstream.hung:
                fut.cancel()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            late = [c.transport.late_writes for c in self.clients] + \
                [link.transport.late_writes for link in self.upstream.links]
            assert not any(late), f"writes after a transport was closed: {late}"
        finally:
            self.loop.close()


# -- what comes out: an independent response parser -------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list = field(default_factory=list)
    body: bytes = b""
    framing: str = "none"  # "length", "chunked", "close" or "none"
    raw: bytes = b""

    def header(self, name: str):
        vals = self.all(name)
        assert len(vals) <= 1, f"{name} appears {len(vals)} times"
        return vals[0] if vals else None

    def all(self, name: str) -> list:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    @property
    def code(self):
        """The JSON error code of a local reply (None for anything else)."""
        if self.header("content-type") != "application/json" or not self.body:
            return None
        doc = self.json()
        return doc.get("error", {}).get("code") if isinstance(doc.get("error"), dict) else None

    @property
    def closes(self) -> bool:
        return "close" in [v.lower() for v in self.all("connection")]


class BadResponse(AssertionError):
    pass


def _parse_head(block: bytes):
    lines = block.split(b"\r\n")
    status_line = lines[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise BadResponse(f"bad status line {status_line!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b"\n" in line or b"\r" in line:
            raise BadResponse(f"bad field line {line!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return int(code), reason, version, headers


def parse_responses(data: bytes, methods=None, eof: bool = False):
    """Split bytes out into responses (RFC 9112 section 6.3 framing). methods
    lists the requests' methods in order (HEAD responses have no body; 1xx
    responses do not use a request up). Returns (responses, unparsed rest);
    a close-delimited body is complete only at eof."""
    methods = list(methods or [])
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        status, reason, version, headers = _parse_head(data[pos:end])
        r = Response(status, reason, version, headers)
        body_at = end + 4
        final = sum(1 for x in out if x.status >= 200)  # 1xx responses do not answer a request
        method = methods[final] if final < len(methods) else "GET"
        te = r.all("transfer-encoding")
        cl = r.all("content-length")
        if te and cl:
            raise BadResponse("both Content-Length and Transfer-Encoding")
        if len(cl) > 1:
            raise BadResponse("two Content-Length fields")
        if 100 <= status < 200 or status in (204, 304) or method == "HEAD":
            r.framing, nxt = "none", body_at
        elif te:
            if [t.lower() for t in te] != ["chunked"]:
                raise BadResponse(f"transfer-encoding {te}")
            r.framing = "chunked"
            body, nxt = _dechunk(data, body_at)
            if nxt < 0:
                break
            r.body = body
        elif cl:
            if not cl[0].isdigit():
                raise BadResponse(f"content-length {cl[0]!r}")
            n = int(cl[0])
            if len(data) - body_at < n:
                break
            r.framing, r.body, nxt = "length", data[body_at:body_at + n], body_at + n
        else:
            if not eof:
                break
            r.framing, r.body, nxt = "close", data[body_at:], len(data)
        r.raw = data[pos:nxt]
        out.append(r)
        pos = nxt
    return out, data[pos:]


def _dechunk(data: bytes, pos: int):
    body = bytearray()
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return b"", -1
        size_text = data[pos:eol]
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise BadResponse(f"chunk size {size_text!r}")
        n = int(size_text, 16)
        pos = eol + 2
        if n == 0:
            if data[pos:pos + 2] == b"\r\n":
                return bytes(body), pos + 2
            if len(data) - pos < 2:
                return b"", -1
            raise BadResponse("trailers in a response (the gateway never sends them)")
        if len(data) - pos < n + 2:
            return b"", -1
        body += data[pos:pos + n]
        if data[pos + n:pos + n + 2] != b"\r\n":
            raise BadResponse("chunk data not followed by CRLF")
        pos += n + 2


def httptools_agrees(data: bytes, responses: list[Response]) -> None:
    """The same bytes through llhttp (httptools): same statuses and bodies.
    For streams without HEAD or close-delimited responses."""
    got: list = []

    class Sink:
        def __init__(self):
            self.body = b""

        def on_message_begin(self):
            self.body = b""

        def on_body(self, b):
            self.body += b

        def on_message_complete(self):
            got.append((parser.get_status_code(), self.body))

    sink = Sink()
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(data)
    assert got == [(r.status, r.body) for r in responses]
