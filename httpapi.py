"""The operator's HTTP interface: /health (liveness) and /ready (readiness) for the kubelet's probes.

Nothing here looks up a name: gevent's WSGIServer would fill SERVER_NAME with socket.getfqdn() of
the listen address when it starts (a reverse lookup through the node's resolver, which may be the
very DNS that is down); it is given the literal address instead.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from typing import Any

from gevent import socket
from gevent.pywsgi import WSGIServer

import wire
from config import Endpoint

IP_FREEBIND = 15  # linux/in.h; not exported by Python 3.11's socket module


def dns_loop_answers(endpoint: Endpoint, timeout: float = 1.0) -> bool:
    """Ask our own DNS socket a question it answers without the upstream; any matching reply is alive."""
    host = endpoint.host
    if host in ("0.0.0.0", "::"):
        host = "::1" if host == "::" else "127.0.0.1"
    qid = secrets.randbits(16)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, endpoint.port))
            sock.send(wire.self_query(qid))
            reply = sock.recv(512)
        except OSError:
            return False
    return wire.is_reply_to(reply, qid)


class _SharedPortWSGIServer(WSGIServer):
    """A WSGIServer whose listener has SO_REUSEPORT: during a takeover the successor binds the same port.

    With ``freebind`` (IP_FREEBIND) it binds an address the node does not have yet: an interception
    address, put on the node only once the install succeeds.
    """

    freebind = False

    def init_socket(self) -> None:
        if not hasattr(self, "socket"):
            self.socket = _shared_listener(self.address, self.family, self.freebind, self.backlog or 128)
        super().init_socket()


def _shared_listener(address: tuple[str, int], family: int, freebind: bool, backlog: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if freebind and family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HttpApi:
    """A small WSGI app on its own address; routes are looked up in one table."""

    def __init__(
        self,
        endpoint: Endpoint,
        is_alive: Callable[[], bool],
        is_ready: Callable[[], tuple[bool, str]],
        log: Any,
        *,
        freebind: bool = False,
    ) -> None:
        """is_alive answers /health (the DNS loop answers), is_ready /ready (ready, and why not)."""
        self.endpoint = endpoint
        self.is_alive = is_alive
        self.is_ready = is_ready
        self.log = log
        self.routes: dict[str, Callable[[dict], tuple[str, str, bytes]]] = {
            "/health": self._health,
            "/healthz": self._health,
            "/ready": self._ready,
            "/readyz": self._ready,
        }
        self.server = _SharedPortWSGIServer(
            (endpoint.host, endpoint.port),
            self._app,
            log=None,
            error_log=None,
            # Set, so that WSGIServer.update_environ never calls socket.getfqdn() on the address.
            environ={"SERVER_NAME": endpoint.host, "SERVER_PORT": str(endpoint.port)},
        )
        self.server.freebind = freebind

    def add_route(self, path: str, handler: Callable[[dict], tuple[str, str, bytes]]) -> None:
        """Later features (metrics, cache control) add their pages here."""
        self.routes[path] = handler

    def start(self) -> None:
        self.server.start()
        self.log.info("http_listening", address=str(self.endpoint), paths=sorted(self.routes))

    def stop(self) -> None:
        self.server.stop(timeout=1)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        handler = self.routes.get(environ.get("PATH_INFO", ""))
        if handler is None:
            status, content_type, body = "404 Not Found", "text/plain", b"not found\n"
        else:
            try:
                status, content_type, body = handler(environ)
            except Exception as exc:  # the boundary: a failing page must not take the server down
                self.log.error("http_handler_failed", path=environ.get("PATH_INFO"), error=repr(exc))
                status, content_type, body = "500 Internal Server Error", "text/plain", b"error\n"
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    def _health(self, environ: dict) -> tuple[str, str, bytes]:
        if self.is_alive():
            return "200 OK", "text/plain", b"ok\n"
        return "503 Service Unavailable", "text/plain", b"dns loop not answering\n"

    def _ready(self, environ: dict) -> tuple[str, str, bytes]:
        ready, reason = self.is_ready()
        if ready:
            return "200 OK", "text/plain", b"ready\n"
        return "503 Service Unavailable", "text/plain", (reason + "\n").encode()
