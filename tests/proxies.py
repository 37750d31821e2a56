"""TCP proxies between the code under test and a real server (moto), for faults on the wire."""

from __future__ import annotations

import socket
import struct
import threading


class CuttingProxy:
    """A TCP proxy to the S3 server that resets a connection once it has sent ``cut_after`` response bytes.

    It cuts at most ``cuts`` times, so a client that re-opens with a Range gets the rest. Real sockets, real
    HTTP: the client sees what it would see when a network path drops mid-download.
    """

    def __init__(self, upstream: str, *, cut_after: int, cuts: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut_after, self.cuts_left, self.cuts = cut_after, cuts, 0
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
                        return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
