"""A fault-injecting HTTP proxy on the loopback address, in front of the loopback S3 server.

Every request is forwarded to the real server; while a fault is set, a share of them (``rate``,
drawn from a seeded generator) fails in that way instead:

  503, 500          the server's error answer, S3's XML, no forwarding
  reset-before      the connection reset before any answer (nothing forwarded)
  reset-during      forwarded, then the connection reset halfway through the answer's body
  truncate          forwarded, the answer cut short (its Content-Length kept)
  corrupt           forwarded, one byte of the answer's body flipped (its length kept)
  put-unanswered    a PUT forwarded (the server applied it), then the connection reset unanswered
  outage            every connection reset at once (the store is unreachable)

The proxy only ever talks to 127.0.0.1; it stops with ``close()``.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("503", "500", "reset-before", "reset-during", "truncate", "corrupt", "put-unanswered", "outage")


class FaultProxy:
    def __init__(self, upstream: tuple[str, int], seed: int = 0):
        self.upstream, self.fault, self.rate = upstream, None, 0.0
        self.rng = random.Random(seed)
        self.injected = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.draw()
                if fault in ("outage", "reset-before"):
                    return self._reset()
                if fault in ("503", "500"):
                    code, what = (503, "SlowDown") if fault == "503" else (500, "InternalError")
                    err = f"<?xml version='1.0'?><Error><Code>{what}</Code><Message>{what}</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD's answer has no body: one left there garbles the next
                        self.wfile.write(err)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "host")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "put-unanswered" and self.command == "PUT":
                    return self._reset()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # a HEAD's length is the object's, and no body follows
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    return
                if fault == "corrupt" and len(data) > 16 and self.command == "GET":
                    i = proxy.rng.randrange(len(data))
                    data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
                if fault in ("truncate", "reset-during") and data and self.command == "GET":
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    return self._reset()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def set(self, fault: str | None, rate: float = 1.0) -> None:
        with self._lock:
            self.fault, self.rate = fault, rate

    def draw(self) -> str | None:
        with self._lock:
            if self.fault is None or self.rng.random() >= self.rate:
                return None
            self.injected += 1
            return self.fault

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
