"""sandbox_client.remote.api, the client's HTTP edge, against real sockets: an unreachable server, host
normalization, and kept-alive connections replaced after an idle pause (a small counting HTTP server is
the reference for how many connections were opened). The mapping of error answers: test_remote_unit.py.
"""
from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import sandbox_client as sc
from sandbox_client.remote.api import ApiClient, normalize_host


def test_unreachable_server_says_so():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(sc.RemoteError, match="is the server running") as info:
        ApiClient(f"http://127.0.0.1:{port}", "isk_x").get_json("/v1/models")
    assert info.value.code == "connection"


def test_normalize_host():
    assert normalize_host("HTTP://Example.ORG:8000/") == "http://example.org:8000"
    assert normalize_host("127.0.0.1:8000") == "http://127.0.0.1:8000"
    with pytest.raises(sc.RemoteError, match="http"):
        normalize_host("ftp://x")


# ----- kept-alive connections ----------------------------------------------------------------------
class _CountingHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive: answers every POST with {} and counts the connections it accepted."""

    protocol_version = "HTTP/1.1"
    connections: list[int] = []

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_a_connection_idle_past_pool_idle_s_is_replaced_before_the_next_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # gunicorn closes a connection idle 5 s; one reused just as it closes fails, so the client opens a new one
    import sandbox_client.remote.api as api_module

    monkeypatch.setattr(api_module, "POOL_IDLE_S", 0.3)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _CountingHandler.connections = []
    try:
        api = ApiClient(f"http://127.0.0.1:{server.server_address[1]}", "k")
        for pause in (0.0, 0.05, 0.05, 0.5, 0.0):
            time.sleep(pause)
            assert api.post_json("/v1/jobs", {"n": 1}) == {}
        assert len(_CountingHandler.connections) == 2           # kept alive, except after the 0.5 s pause
        api.close()
    finally:
        server.shutdown()
        server.server_close()
