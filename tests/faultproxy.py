"""A fault-injecting HTTP proxy for the loopback S3 server (a test helper, not a test module).

It listens on 127.0.0.1, forwards every request to the upstream (moto) unchanged, and answers
some of them with a fault instead, as scheduled by :meth:`FaultProxy.inject`:

- ``slowdown``: 503 with S3's SlowDown error document (throttling)
- ``internal``: 500 InternalError
- ``stall``: reads the request, then sends nothing for ``stall_s`` seconds and closes (a client
  with a shorter read timeout sees a timeout)
- ``reset``: reads the request, then resets the connection (TCP RST)
- ``forbidden``: 403 AccessDenied (a permanent error: must not be retried)

Point ``StorageOptions(endpoint_url=proxy.url)`` at it. ``proxy.log`` records (method, path,
fault or None) for every request, so tests can count attempts and check the bounds.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "proxy-authorization", "te", "upgrade"}
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "forbidden": (403, "Forbidden", "AccessDenied", "Access Denied"),
}
FAULTS = (*_ERRORS, "stall", "reset")


@dataclass
class _Rule:
    fault: str
    times: int
    method: str | None
    path: re.Pattern[str] | None
    skip: int  # matching requests let through before the fault starts

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or bool(self.path.search(path)))


class FaultProxy:
    def __init__(self, upstream: str, *, stall_s: float = 2.0):
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.stall_s = stall_s
        self.log: list[tuple[str, str, str | None]] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, fault: str, *, times: int = 1, method: str | None = None, path: str | None = None, skip: int = 0) -> None:
        """Answer the next ``times`` requests matching ``method`` and the ``path`` regex (after
        letting ``skip`` of them through) with ``fault``."""
        assert fault in FAULTS, f"unknown fault {fault!r}; one of {FAULTS}"
        with self._lock:
            self._rules.append(_Rule(fault, times, method, re.compile(path) if path else None, skip))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def injected(self, fault: str | None = None) -> int:
        return sum(1 for _, _, f in self.log if f is not None and (fault is None or f == fault))

    def requests(self, method: str | None = None, path: str | None = None) -> int:
        rx = re.compile(path) if path else None
        return sum(1 for m, p, _ in self.log if (method is None or m == method) and (rx is None or rx.search(p)))

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            fault = None
            for r in self._rules:
                if r.times > 0 and r.matches(method, path):
                    if r.skip > 0:
                        r.skip -= 1
                        continue
                    r.times -= 1
                    fault = r.fault
                    break
            self.log.append((method, path, fault))
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _error(self, fault: str) -> None:
                status, reason, code, message = _ERRORS[fault]
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<RequestId>fault-proxy</RequestId></Error>"
                ).encode()
                self.send_response_only(status, reason)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _any(self) -> None:
                body = self._body()
                fault = proxy._decide(self.command, self.path)
                if fault in _ERRORS:
                    return self._error(fault)
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                    return self._reset()
                if fault == "reset":
                    return self._reset()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response_only(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (OSError, ValueError):  # the socket was reset on purpose
                    self.close_connection = True

        return Handler
