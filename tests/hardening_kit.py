"""Shared pieces of the hardening tests (tests/integration/test_h_*.py): an
upstream that records the exact bytes it receives, a gateway with keyed
routes in front of it, and the refusal check every family uses.

Each refusal is checked the same way: the status and JSON error code, that
the upstream recorded nothing of the request (every request carries a unique
marker), the connection's fate (closed, or still serving), and a follow-up
request on a fresh connection that is served cleanly.
"""

from __future__ import annotations

import itertools
import json
import socket
import textwrap
import threading
import time
from dataclasses import dataclass, field

import httptools

from conftest import Gateway

READ_TIMEOUT = 5.0
_markers = itertools.count(1)


def marker() -> str:
    """A token unique to one request, to look for in what the upstream got."""
    return f"mk{next(_markers):06d}x{int(time.time() * 1000) % 100000}"


# -- the recording upstream ------------------------------------------------------------


@dataclass
class Message:
    method: bytes
    url: bytes
    headers: list
    body: bytes

    def header(self, name: str):
        vals = [v.decode("latin-1") for n, v in self.headers if n.decode("latin-1").lower() == name.lower()]
        return vals[0] if vals else None


@dataclass
class UpConn:
    data: bytearray = field(default_factory=bytearray)
    messages: list = field(default_factory=list)
    ended: str = ""  # "fin", "rst" or "" while open
    upgraded: bool = False
    before_101: int = 0  # bytes after an upgrade head that arrived before our 101
    held: bytes = b""


class _Proto:
    def __init__(self):
        self.parser = None
        self.url = b""
        self.headers = []
        self.body = b""
        self.done = []

    def on_message_begin(self):
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.done.append((self.parser.get_method(), self.url, self.headers, self.body))


class RecordingUpstream:
    """A threaded raw HTTP/1.1 server on 127.0.0.1:0 that keeps every byte.

    Answers by path: '/slow' answers after a second; '/cut' sends a head promising 100000 bytes, 1000 of them,
    then closes ('/cut-rst': resets); '/upgrade-anyway' answers 101 whatever
    was asked; an upgrade to '/ws' gets a 101 and an echo; anything else gets a
    200 JSON echo of method, path, fields and body size."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.conns: list[UpConn] = []
        self.stopping = False
        self._threads = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    # -- what the tests ask ------------------------------------------------
    def raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(c.data) for c in self.conns)

    def saw(self, needle: str | bytes) -> bool:
        if isinstance(needle, str):
            needle = needle.encode()
        return needle in self.raw()

    def messages(self) -> list[Message]:
        with self.lock:
            return [m for c in self.conns for m in c.messages]

    def message_with(self, needle: str) -> Message:
        found = [m for m in self.messages() if needle.encode() in m.url or any(needle.encode() in v for _, v in m.headers)]
        assert len(found) == 1, f"{len(found)} upstream messages carry {needle!r}"
        return found[0]

    def conn_with(self, needle: str) -> UpConn:
        with self.lock:
            found = [c for c in self.conns if needle.encode() in c.data]
        assert len(found) == 1, f"{len(found)} upstream connections carry {needle!r}"
        return found[0]

    def close(self):
        self.stopping = True
        self.sock.close()

    # -- serving -------------------------------------------------------------
    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            rec = UpConn()
            with self.lock:
                self.conns.append(rec)
            t = threading.Thread(target=self._serve, args=(c, rec), daemon=True)
            t.start()

    def _serve(self, c: socket.socket, rec: UpConn):
        try:
            self._serve1(c, rec)
        except OSError:  # the gateway reset us while we were answering
            rec.ended = rec.ended or "rst"

    def _serve1(self, c: socket.socket, rec: UpConn):
        proto = _Proto()
        parser = proto.parser = httptools.HttpRequestParser(proto)
        c.settimeout(30)
        try:
            while True:
                try:
                    data = c.recv(65536)
                except ConnectionResetError:
                    rec.ended = "rst"
                    return
                except OSError:
                    rec.ended = "rst"
                    return
                if not data:
                    rec.ended = "fin"
                    return
                with self.lock:
                    rec.data += data
                if rec.upgraded:
                    c.sendall(data)
                    continue
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    # the upgrade request itself is answered with a 101, not a 200
                    method, url, headers, body = proto.done.pop()
                    self._complete(c, rec, proto)
                    with self.lock:
                        rec.messages.append(Message(method, url, headers, body))
                    rec.upgraded = True
                    # Did anything after the head come before our 101? Wait a
                    # little to give early bytes the chance to show.
                    rec.before_101 = len(data) - exc.args[0]
                    c.settimeout(0.3)
                    try:
                        more = c.recv(65536)
                        with self.lock:
                            rec.data += more
                        rec.before_101 += len(more)
                        rec.held = more
                    except socket.timeout:
                        rec.held = b""
                    c.settimeout(30)
                    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                              if url.startswith(b"/ws") or url.startswith(b"/api/public/ws") else
                              b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    if rec.held:
                        c.sendall(rec.held)
                    continue
                except httptools.HttpParserError:
                    c.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    return
                if not self._complete(c, rec, proto):
                    return
        finally:
            try:
                c.close()
            except OSError:
                pass

    def _complete(self, c, rec: UpConn, proto: _Proto) -> bool:
        """Answer the messages completed so far; False: the connection ends."""
        while proto.done:
            method, url, headers, body = proto.done.pop(0)
            msg = Message(method, url, headers, body)
            with self.lock:
                rec.messages.append(msg)
            path = url.split(b"?", 1)[0]
            if path.endswith(b"/cut") or path.endswith(b"/cut-rst"):
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
                time.sleep(0.1)
                if path.endswith(b"/cut-rst"):
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return False
            if path.endswith(b"/slow"):
                time.sleep(1.0)
            if path.endswith(b"/upgrade-anyway"):
                c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                rec.upgraded = True
                return True
            payload = json.dumps({
                "path": url.decode("latin-1"),
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
                "body_bytes": len(body),
            }).encode()
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                      % (len(payload), payload))
        return True


# -- raw client --------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list
    body: bytes

    def header(self, name: str):
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return vals[0] if vals else None

    def json(self):
        return json.loads(self.body)

    @property
    def code(self):
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def parse_replies(data: bytes) -> tuple[list[Reply], bytes]:
    """Complete responses in data (Content-Length or chunked), and the rest."""
    out = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return out, data
        lines = data[:end].decode("latin-1").split("\r\n")
        rest = data[end + 4:]
        status = int(lines[0].split(" ", 2)[1])
        headers = [(n, v.strip()) for n, _, v in (ln.partition(":") for ln in lines[1:])]
        r = Reply(status, headers, b"")
        te = r.header("transfer-encoding")
        if status < 200 or status in (204, 304):
            body = b""
        elif te:
            body = b""
            while True:
                i = rest.find(b"\r\n")
                if i < 0:
                    return out, data
                size = int(rest[:i], 16)
                if len(rest) < i + 2 + size + 2:
                    return out, data
                body += rest[i + 2:i + 2 + size]
                rest = rest[i + 4 + size:]
                if size == 0:
                    break
        else:
            n = int(r.header("content-length") or 0)
            if len(rest) < n:
                return out, data
            body, rest = rest[:n], rest[n:]
        r.body = body
        out.append(r)
        data = rest


class Client:
    """One raw connection: send bytes, read replies, see whether it closed."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT)
        self.buf = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def read(self, n: int = 1, timeout: float = READ_TIMEOUT) -> list[Reply]:
        deadline = time.monotonic() + timeout
        while True:
            replies, rest = parse_replies(self.buf)
            if len(replies) >= n or self.closed or time.monotonic() > deadline:
                if len(replies) >= n:
                    # keep what follows the n-th reply
                    consumed = len(self.buf) - len(rest)
                    self.buf = self.buf[consumed:]
                return replies
            self._recv(deadline)

    def _recv(self, deadline: float) -> None:
        self.s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.s.recv(65536)
        except socket.timeout:
            return
        except ConnectionResetError:
            self.closed = True
            return
        if not chunk:
            self.closed = True
        self.buf += chunk

    def wait_closed(self, timeout: float = READ_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._recv(deadline)
        return self.closed

    def close(self):
        self.s.close()


# -- the gateway in front of it -------------------------------------------------------------

BASE = """
[server]
drain_timeout = 5.0
{server}
[keys]
store = "keys.db"
failed_auth_limit = "off"
[[upstreams]]
name = "rec"
targets = ["{addr}"]
[[routes]]
name = "open"
path = "/"
upstream = "rec"
auth = "none"
[[routes]]
name = "api"
path = "/api"
upstream = "rec"
auth = "key"
{extra}
"""


class Harness:
    """A 2-worker gateway with an open '/' and a keyed '/api' in front of a
    RecordingUpstream, and a key scoped to 'GET /api/public/*'."""

    def __init__(self, tmp_path, server: str = "", extra: str = "", scopes=("GET /api/public/*",), workers=2):
        self.up = RecordingUpstream()
        self.dir = tmp_path
        path = tmp_path / "gateway.toml"
        path.write_text(BASE.format(server=textwrap.dedent(server), addr=self.up.addr, extra=textwrap.dedent(extra)))
        self.gw = Gateway(path, workers=workers)
        self.port = self.gw.port
        r = self.gw.admin("POST", "/keys", json={"name": "scoped", "scopes": list(scopes)}, expect=201)
        self.key = r.json()["key"]
        self.key_id = r.json()["id"]

    def stop(self):
        self.gw.stop()
        self.up.close()

    def metric(self, name: str, at_least: float, timeout: float = 5.0) -> float:
        """The summed value of a /metrics sample, polled until it reaches at_least
        (workers publish about once a second)."""
        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + timeout
        value = 0.0
        while time.monotonic() < deadline:
            text = self.gw.admin("GET", "/metrics").text
            value = sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                        if s.name == name)
            if value >= at_least:
                break
            time.sleep(0.1)
        return value

    def log_lines(self, needle: str, n: int = 1, timeout: float = 5.0) -> list[dict]:
        """Access-log records whose path holds needle (the log is flushed on a timer)."""
        deadline = time.monotonic() + timeout
        found = []
        while time.monotonic() < deadline:
            path = self.dir / "access.log"
            if path.exists():
                found = [json.loads(line) for line in path.read_text().splitlines() if needle in line]
                if len(found) >= n:
                    break
            time.sleep(0.05)
        return found

    def request(self, raw: bytes, n: int = 1) -> tuple[list[Reply], Client]:
        c = Client(self.port)
        c.send(raw)
        return c.read(n), c

    def get(self, path: str, headers: str = "", key: bool = False) -> Reply:
        """A well-formed request on a fresh connection."""
        raw = f"GET {path} HTTP/1.1\r\nHost: gw\r\n{headers}".encode()
        if key:
            raw += f"x-api-key: {self.key}\r\n".encode()
        (r,), c = self.request(raw + b"\r\n")
        c.close()
        return r

    def assert_refused(self, raw: bytes, status: int, code: str, mark: str, fate: str = "closed") -> Reply:
        """raw carries mark; it must be refused with status/code, the upstream
        must have seen nothing of it, the connection must end as fate says,
        and a fresh connection must be served cleanly after."""
        c = Client(self.port)
        try:
            try:
                c.send(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused while we were still sending; the reply may be there
            replies = c.read(1)
            assert replies, f"no reply to a refused request (buffer {c.buf[:200]!r})"
            r = replies[0]
            assert (r.status, r.code) == (status, code), (r.status, r.body)
            assert r.header("content-type") == "application/json"
            if fate == "closed":
                assert c.wait_closed(), "the connection stayed open after a refusal"
            else:
                c.send(b"GET /api/public/follow HTTP/1.1\r\nHost: gw\r\nx-api-key: " + self.key.encode() + b"\r\n\r\n")
                (follow,) = c.read(1)
                assert follow.status == 200, follow.body
        finally:
            c.close()
        time.sleep(0.05)  # let a (wrongly) forwarded request reach the recorder
        assert not self.up.saw(mark), f"the upstream received part of a refused request ({mark})"
        follow = self.get("/api/public/after-refusal", key=True)
        assert follow.status == 200, follow.body
        return r
