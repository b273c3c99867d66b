"""HOT PATH. One keep-alive HTTP/1.1 connection to an upstream target.

Drives one exchange at a time: writes the request head and body that the client
side hands it, parses the response with fastgate._http.ResponseParser (the
status line and the framing fields; the other fields pass through as one
block) and hands head and body back to the client side. Never pipelines to
the upstream.
"""

from __future__ import annotations

import asyncio

from .._http import EV_BODY, EV_END, EV_ERROR, EV_HEAD, EV_UPGRADE, ResponseParser

# Response framing towards the client, decided at the response head.
FRAME_NONE = 0  # no body (HEAD, 1xx, 204, 304)
FRAME_LENGTH = 1  # Content-Length: forwarded as is
FRAME_CHUNKED = 2  # we re-chunk what the parser decoded
FRAME_CLOSE = 3  # HTTP/1.0 client, body ends when we close


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
        "got_bytes",
        "tunnel",
        "resp_done",
        "reusable",
    )

    def __init__(self, target):
        self.target = target
        self.transport = None
        self.parser = ResponseParser()
        self.ex = None
        self.closed = False
        self.reused = False
        self.idle_until = 0.0
        self.deadline = 0.0
        self.got_bytes = False
        self.tunnel = None
        self.resp_done = False
        self.reusable = False

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
            self.on_events(self.parser.feed(data))
        finally:
            client.flush()

    def on_events(self, events: list) -> None:
        n = len(events)
        i = 0
        while i < n:
            kind = events[i]
            value = events[i + 1]
            i += 2
            ex = self.ex
            if kind == EV_BODY:
                if ex is not None:
                    ex.conn.response_body(ex, value)
            elif kind == EV_HEAD:
                if ex is None:
                    return
                # A connection that answered HEAD is never pooled: some upstreams
                # send a body anyway, which would be read as the next response.
                self.reusable = value.keep_alive and ex.method != b"HEAD"
                ex.conn.response_head(ex, value, self)
            elif kind == EV_END:
                if ex is None or self.resp_done:
                    continue
                self.resp_done = True
                ex.conn.response_complete(ex, self, self.reusable)
            elif kind == EV_UPGRADE:
                if ex is None or not ex.conn.upstream_upgraded(self, value):
                    self.transport.close()
                return
            else:
                self.transport.abort()
                if ex is not None:
                    ex.conn.upstream_failed(ex, "upstream_unavailable", f"invalid response from upstream: {value[1]}")
                return

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
        client = ex.conn
        if self.parser.until_close:
            # a close-delimited body: EOF is its end
            client.out = []
            try:
                self.on_events(self.parser.eof())
            finally:
                client.flush()
            return
        self.ex = None
        if not self.resp_done:
            client.upstream_lost(ex, self)

    def pause_writing(self):
        ex = self.ex
        if ex is not None:
            ex.conn.pause_reading(1)

    def resume_writing(self):
        ex = self.ex
        if ex is not None and not ex.conn.closed:
            ex.conn.resume_reading(1)

    # -- driven by the client side ---------------------------------------
    def start(self, ex, head: bytes, now: float) -> None:
        self.ex = ex
        self.resp_done = False
        self.reusable = False
        self.got_bytes = False
        self.deadline = now + self.target.read_timeout
        self.parser.start(ex.method == b"HEAD", ex.upgrade is not None)
        ex.up = self
        self.transport.write(head)
