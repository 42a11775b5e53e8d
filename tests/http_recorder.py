"""Loopback HTTP servers for the tests of what parameters may fetch: every request recorded
(method, path, headers); a route per path, else the canary body (which must never be read)."""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any

CANARY_BODY = b"canary-secret-body"


class Recorder:
    """A threading HTTP server on loopback that records every request (path and headers)."""

    def __init__(self, routes: dict[str, Any] | None = None):
        self.hits: list[dict] = []
        self.routes = routes or {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                outer.hits.append({"method": self.command, "path": self.path,
                                   "headers": {k.lower(): v for k, v in self.headers.items()}})
                route = outer.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_response(200)
                    self.send_header("content-length", str(len(CANARY_BODY)))
                    self.end_headers()
                    self.wfile.write(CANARY_BODY)
                else:
                    route(self)

            do_GET = do_POST = _any  # noqa: N815

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def redirect_to(target: str, code: int = 302):
    def route(h):
        h.send_response(code)
        h.send_header("location", target)
        h.send_header("content-length", "0")
        h.end_headers()
    return route


def trickle(length: int, chunks: int, every_s: float, byte: bytes = b"x"):
    """A route that promises `length` bytes and sends one byte every `every_s` seconds."""

    def route(h):
        h.send_response(200)
        h.send_header("content-length", str(length))
        h.end_headers()
        try:
            for _ in range(chunks):
                h.wfile.write(byte)
                h.wfile.flush()
                time.sleep(every_s)
        except OSError:
            pass

    return route
