"""TCP proxies between the code under test and a real server (moto), for faults on the wire.

The server keeps its data whatever the proxy does, so a test sees what a client sees when the network
path to S3 (or the API server) fails while the service behind it is fine.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")


def _reset(sock: socket.socket) -> None:
    """Drop ``sock`` with a TCP reset (no FIN), as a broken network path or a restarted peer does; the
    shutdown also wakes a pump thread blocked reading it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Proxy:
    """A TCP proxy to the S3 server: real sockets, real HTTP; subclasses act on what crosses it."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.lock = threading.Condition()  # a lock that subclasses can also wait on
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self._open(client)

    def _open(self, client: socket.socket) -> socket.socket | None:
        """Connect a newly accepted client to the server and start its two pumps; the server's socket."""
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _reset(client)
            return None
        self._opened(client, upstream)
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()
        return upstream

    def _opened(self, client: socket.socket, upstream: socket.socket) -> None:
        """Called for each new connection, before anything crosses it."""

    def _pump(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if not self._forward(data, src, dst, response, sent):
                    return
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # shutdown wakes the other pump, blocked reading its side
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass
            self._closed(src, dst)

    def _closed(self, src: socket.socket, dst: socket.socket) -> None:
        """Called when a pump ends (both sockets closed)."""

    def _forward(
        self, data: bytes, src: socket.socket, dst: socket.socket, response: bool, sent: int
    ) -> bool:
        """Send ``data`` on (``sent`` bytes went this way on this connection before); False ends it."""
        dst.sendall(data)
        return True

    def close(self) -> None:
        self.server.close()


class CuttingProxy(_Proxy):
    """A TCP proxy to the S3 server that resets a connection once it has sent ``cut_after`` response bytes.

    It cuts at most ``cuts`` times, so a client that re-opens with a Range gets the rest: the client sees
    what it would see when a network path drops mid-download.
    """

    def __init__(self, upstream: str, *, cut_after: int, cuts: int) -> None:
        self.cut_after, self.cuts_left, self.cuts = cut_after, cuts, 0
        super().__init__(upstream)

    def _forward(
        self, data: bytes, src: socket.socket, dst: socket.socket, response: bool, sent: int
    ) -> bool:
        if response and sent + len(data) > self.cut_after:
            with self.lock:
                cut = self.cuts_left > 0
                if cut:
                    self.cuts_left -= 1
                    self.cuts += 1
            if cut:
                dst.sendall(data[: self.cut_after - sent])
                for s in (src, dst):  # drop both sides now (shutdown also wakes the other pump)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)
                return False
        dst.sendall(data)
        return True


class LatencyProxy(_Proxy):
    """A TCP proxy to the S3 server that holds every request ``delay`` seconds before passing it on.

    Each request then waits ``delay`` for its first byte, as one to a distant S3 endpoint does. It counts
    the GETs it saw and the most requests held at once: ``max_waiting >= 2`` means the client had GETs in
    flight concurrently, whatever the machine's speed.
    """

    def __init__(self, upstream: str, *, delay: float) -> None:
        self.delay, self.gets, self.waiting, self.max_waiting = delay, 0, 0, 0
        super().__init__(upstream)

    def _forward(
        self, data: bytes, src: socket.socket, dst: socket.socket, response: bool, sent: int
    ) -> bool:
        if not response and data.startswith(_METHODS):  # a new request (small: its headers come at once)
            with self.lock:
                self.gets += data.startswith(b"GET ")
                self.waiting += 1
                self.max_waiting = max(self.max_waiting, self.waiting)
            time.sleep(self.delay)
            with self.lock:
                self.waiting -= 1
        dst.sendall(data)
        return True

    def reset(self) -> None:
        with self.lock:
            self.gets, self.max_waiting = 0, self.waiting


_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId></Error>"
)
SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nx-amz-request-id: FAULTPROXY\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_SLOW_DOWN_BODY) + _SLOW_DOWN_BODY
)
MODES = ("pass", "drop", "stall", "http503")


class FaultProxy(_Proxy):
    """A TCP proxy to the S3 server whose fault the test switches while the code under test runs.

    Modes (:meth:`set_mode`):

    - ``pass``: bytes cross both ways unchanged;
    - ``drop``: every open connection is reset at once, and every new one as soon as it is accepted;
    - ``stall``: connections are accepted and what arrives either way is held, nothing is sent, until the
      mode changes (then what was held is passed on, or dropped in ``drop``): the peer waits on an open,
      silent connection, as behind a dead path whose TCP has not noticed yet;
    - ``http503``: each new request is answered ``503 Slow Down`` with S3's XML error body, and its
      connection closed (the request's body, if any, is read and discarded first, so that the client reads
      the answer rather than a reset); responses already under way go on.

    It counts what it did: ``resets`` (connections dropped), ``held`` (chunks held by a stall),
    ``answered_503``, ``requests`` (requests passed to the server) and ``bytes`` (crossed either way).
    """

    def __init__(self, upstream: str) -> None:
        self.mode = "pass"
        self.resets = self.held = self.answered_503 = self.requests = self.bytes = 0
        self._armed: tuple[int, str, float | None] | None = None
        self._open_socks: set[socket.socket] = set()
        super().__init__(upstream)

    def set_mode(self, mode: str, *, after_bytes: int = 0, for_s: float | None = None) -> None:
        """Switch to ``mode`` now, or once ``after_bytes`` more bytes have crossed (a fault in the middle
        of a body, wherever the machine's speed puts the reader then); back to ``pass`` ``for_s`` seconds
        after the switch."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        with self.lock:
            if after_bytes:
                self._armed = (self.bytes + after_bytes, mode, for_s)
                return
            self._switch(mode, for_s)

    def _switch(self, mode: str, for_s: float | None) -> None:  # with the lock held
        self.mode, self._armed = mode, None
        if mode == "drop":
            self.resets += len(self._open_socks) // 2  # two sockets a connection
            for sock in list(self._open_socks):
                _reset(sock)
            self._open_socks.clear()
        self.lock.notify_all()
        if for_s is not None:
            timer = threading.Timer(for_s, self.set_mode, ("pass",))
            timer.daemon = True
            timer.start()

    def _open(self, client: socket.socket) -> socket.socket | None:
        with self.lock:
            if self.mode == "drop":
                self.resets += 1
                _reset(client)
                return None
        return super()._open(client)

    def _opened(self, client: socket.socket, upstream: socket.socket) -> None:
        with self.lock:
            self._open_socks.update((client, upstream))

    def _closed(self, src: socket.socket, dst: socket.socket) -> None:
        with self.lock:
            self._open_socks.discard(src)
            self._open_socks.discard(dst)

    def _forward(
        self, data: bytes, src: socket.socket, dst: socket.socket, response: bool, sent: int
    ) -> bool:
        with self.lock:
            self.bytes += len(data)
            if self._armed is not None and self.bytes >= self._armed[0]:
                self._switch(*self._armed[1:])
            if self.mode == "stall":
                self.held += 1
                self.lock.wait_for(lambda: self.mode != "stall")
            mode = self.mode
            request = not response and data.startswith(_METHODS)  # a request's headers come at once
            if mode == "drop":
                if src in self._open_socks:  # not yet counted by the switch to "drop"
                    self.resets += 1
                    self._open_socks.difference_update((src, dst))
            elif mode == "http503" and request:
                self.answered_503 += 1
            elif request:
                self.requests += 1
        if mode == "drop":
            _reset(src)
            _reset(dst)
            return False
        if mode == "http503" and request:
            self._answer_503(src)
            return False
        dst.sendall(data)
        return True

    @staticmethod
    def _answer_503(client: socket.socket) -> None:
        """Answer 503 and close after the client is done sending (a lingering close, as HTTP servers do)."""
        try:
            client.sendall(SLOW_DOWN)
            client.shutdown(socket.SHUT_WR)
            client.settimeout(5.0)
            while client.recv(65536):  # the rest of a PUT's body, if the client sends it
                pass
        except OSError:
            pass
