"""A fault-injecting HTTP proxy on loopback, in front of the moto S3 server (toxiproxy-style, for tests).

Every ``every``-th request gets a fault instead of an answer, the kinds in turn: ``500`` (InternalError),
``503`` (SlowDown, S3's throttling answer) and ``reset`` (the connection closed with a TCP RST before any
byte of an answer). Everything else is forwarded to the real server as it came and its answer relayed.
With ``deny_writes``, writes under a prefix get 403 AccessDenied, as a read-only grant answers. The faults
are counted, so a test can tell that they happened.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "reset")
S3_ERRORS = {"403": ("AccessDenied", "Access Denied"),
             "500": ("InternalError", "We encountered an internal error. Please try again."),
             "503": ("SlowDown", "Please reduce your request rate.")}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultyProxy:
    def __init__(self, target: str, every: int = 5, kinds: tuple[str, ...] = KINDS, deny_writes: str | None = None):
        """``deny_writes``: a path (``/bucket/prefix``) under which every write or delete gets 403 AccessDenied,
        as a read-only grant answers; other requests are forwarded (and faulted every ``every``-th)."""
        if every < 2:
            raise ValueError("every must be >= 2: a proxy that fails every request lets no retry succeed")
        self.target = urlsplit(target)
        self.every, self.kinds, self.deny_writes = every, kinds, deny_writes
        self.requests, self.injected = 0, Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                denied = (proxy.deny_writes is not None and self.command in ("PUT", "POST", "DELETE")
                          and self.path.startswith(proxy.deny_writes))
                fault = "403" if denied else proxy._next_fault()
                if denied:
                    with proxy.lock:
                        proxy.injected["403"] += 1
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    code, message = S3_ERRORS[fault]
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                               f"<Message>{message}</Message></Error>").encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for k, v in answer.getheaders():
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _next_fault(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.requests % self.every:
                return None
            kind = self.kinds[(self.requests // self.every - 1) % len(self.kinds)]
            self.injected[kind] += 1
            return kind

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
