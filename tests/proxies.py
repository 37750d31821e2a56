"""TCP proxies between the code under test and a real server (moto), for faults on the wire."""

from __future__ import annotations

import socket
import struct
import threading
import time

_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")


class _Proxy:
    """A TCP proxy to the S3 server: real sockets, real HTTP; subclasses act on what crosses it."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

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
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

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
