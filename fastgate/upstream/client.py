"""HOT PATH. One keep-alive HTTP/1.1 connection to an upstream target.

Drives one exchange at a time: writes the request head and body that the client
side hands it, parses the response with httptools and hands head and body back
to the client side. Never pipelines to the upstream.
"""

from __future__ import annotations

import asyncio

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from ..server.http1 import HOP_BY_HOP

# Response framing decided at the response head.
FRAME_NONE = 0  # no body (HEAD, 1xx, 204, 304)
FRAME_LENGTH = 1  # Content-Length: forwarded as is
FRAME_CHUNKED = 2  # we re-chunk what httptools decoded
FRAME_CLOSE = 3  # HTTP/1.0 client, body ends when we close

# Response headers we rewrite ourselves, on top of the hop-by-hop set.
_MANAGED = HOP_BY_HOP | {b"content-length"}


class UpstreamConn(asyncio.Protocol):
    __slots__ = (
        "target",
        "transport",
        "parser",
        "ex",
        "closed",
        "reused",
        "idle_until",
        "deadline",
        "headers",
        "got_bytes",
        "interim",
        "tunnel",
        "resp_length",
        "resp_chunked",
        "resp_done",
    )

    def __init__(self, target):
        self.target = target
        self.transport = None
        self.parser = HttpResponseParser(self)
        self.ex = None
        self.closed = False
        self.reused = False
        self.idle_until = 0.0
        self.deadline = 0.0
        self.headers = []
        self.got_bytes = False
        self.interim = False
        self.tunnel = None
        self.resp_length = None
        self.resp_chunked = False
        self.resp_done = False

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        ex = self.ex
        if ex is None:
            # An idle pooled connection must not speak: the pooled state is unknown now.
            self.transport.close()
            return
        self.got_bytes = True
        client = ex.conn
        self.deadline = client.w.now + self.target.read_timeout
        client.out = []
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.ex is not None and self.ex.conn.upstream_upgraded(self, data[exc.args[0]:]):
                return
            self.transport.close()
        except HttpParserError as exc:
            ex = self.ex
            self.transport.abort()
            if ex is not None:
                ex.conn.upstream_failed(ex, "upstream_unavailable", f"invalid response from upstream: {exc}")
        finally:
            client.flush()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.transport.close()
            return
        ex = self.ex
        if ex is None:
            self.target.discard(self)
            return
        self.ex = None
        if ex.resp_started and self.resp_length is None and not self.resp_chunked and not self.resp_done:
            # Close-delimited body (no length, not chunked): EOF is its end.
            if ex.resp_frame != FRAME_NONE:
                ex.conn.response_complete(ex, self, reusable=False)
                return
        if not self.resp_done:
            ex.conn.upstream_lost(ex, self)

    def pause_writing(self):
        ex = self.ex
        if ex is not None:
            ex.conn.pause_reading(1)

    def resume_writing(self):
        ex = self.ex
        if ex is not None and not ex.conn.closed:
            ex.conn.resume_reading(1)

    # -- httptools callbacks ---------------------------------------------
    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_headers_complete(self):
        headers = self.headers
        self.headers = []  # for the next message (an interim response may precede)
        ex = self.ex
        if ex is None:
            return
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): we answer the
            # client's Expect ourselves, so these are not forwarded.
            self.interim = True
            return
        if status == 101:
            # Switching protocols: Connection/Upgrade are the message itself.
            if ex.upgrade is None:
                self.transport.abort()
                ex.conn.upstream_failed(ex, "upstream_unavailable", "upstream switched protocols unasked")
                return
            # llhttp reports the 101 as a complete message before it pauses for
            # the upgrade: interim=True keeps on_message_complete from ending it.
            self.interim = True
            ex.conn.response_head(ex, 101, [(n.lower(), n, v) for n, v in headers], None, False, self)
            return
        length = None
        chunked = False
        drop = None
        out = []
        for name, value in headers:
            ln = name.lower()
            if ln in _MANAGED:
                if ln == b"content-length":
                    length = value
                elif ln == b"transfer-encoding":
                    chunked = True
                elif ln == b"connection":
                    drop = {t.strip().lower() for t in value.split(b",")}
                continue
            out.append((ln, name, value))
        if drop:
            out = [h for h in out if h[0] not in drop]
        self.resp_length = length
        self.resp_chunked = chunked
        ex.conn.response_head(ex, status, out, length, chunked, self)

    def on_body(self, body):
        ex = self.ex
        if ex is not None and not self.interim:
            ex.conn.response_body(ex, body)

    def on_message_complete(self):
        if self.interim:
            self.interim = False
            return
        ex = self.ex
        if ex is None or self.resp_done:
            return
        self.resp_done = True
        ex.conn.response_complete(ex, self, reusable=self.parser.should_keep_alive())

    # -- driven by the client side ---------------------------------------
    def start(self, ex, head: bytes, now: float) -> None:
        self.ex = ex
        self.resp_done = False
        self.resp_length = None
        self.resp_chunked = False
        self.got_bytes = False
        self.deadline = now + self.target.read_timeout
        ex.up = self
        self.transport.write(head)
