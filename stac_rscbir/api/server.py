"""An app under uvicorn on a background thread, on loopback: for the demo, examples and tests."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """Serve ``app`` with uvicorn on a daemon thread; ``url`` once started.

    Use as a context manager, or ``start()`` then ``stop()`` (or ``wait()`` to serve until
    Ctrl-C).
    """

    def __init__(
        self, app: Any, port: int | None = None, host: str = "127.0.0.1", timeout: float = 60.0
    ) -> None:
        import uvicorn

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.timeout = timeout
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> BackgroundServer:
        """Start and wait until it accepts requests (RuntimeError after ``timeout``)."""
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"the API did not start on {self.url}")
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def wait(self) -> None:
        """Serve until interrupted (Ctrl-C), then stop."""
        try:
            self._thread.join()
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
