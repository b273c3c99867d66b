"""The built-in demo upstream used by the embedded default config.

A small echo service: every request is answered with JSON describing what the
upstream received (method, path, query, headers, body size), which makes what
the gateway adds and strips visible with one curl.
"""

from __future__ import annotations

import asyncio
import signal
import socket

import msgspec
import uvloop
from httptools import HttpParserError, HttpRequestParser

_enc = msgspec.json.Encoder()


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.parser = HttpRequestParser(self)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.transport.close()

    def on_message_begin(self):
        self.url = b""
        self.headers = []
        self.body = 0

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append([name.decode("latin-1"), value.decode("latin-1")])

    def on_body(self, body):
        self.body += len(body)

    def on_message_complete(self):
        path, _, query = self.url.partition(b"?")
        body = _enc.encode(
            {
                "service": "fastgate demo upstream",
                "method": self.parser.get_method().decode(),
                "path": path.decode("latin-1"),
                "query": query.decode("latin-1"),
                "headers": self.headers,
                "body_bytes": self.body,
            }
        )
        keep = self.parser.should_keep_alive()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (len(body), b"" if keep else b"connection: close\r\n", body)
        )
        if not keep:
            self.transport.close()


def serve(sock: socket.socket) -> None:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    server = loop.run_until_complete(loop.create_server(EchoProtocol, sock=sock))
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
