"""``stac-rscbir serve`` as a separate OS process on a free loopback port, and the one wait for a
server process to answer: used by the fault and replica tests and by the benchmarks that start
servers (benchmarks put the repository root on ``sys.path`` and import it as ``tests.serving``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from stac_rscbir.api.server import free_port


def wait_until_up(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0, log: Path | None = None
) -> None:
    """Return once ``GET url/`` answers 200 (every 50 ms while the server does not accept
    connections); RuntimeError, with the tail of ``log``, when the process exits first or
    ``timeout`` seconds pass."""

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""

    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server on {url} exited ({proc.returncode}):\n{tail()}")
            try:
                if client.get("/").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"the server on {url} did not answer within {timeout:.0f} s:\n{tail()}")


def store_args(kind: str, target: str) -> list[str]:
    """The ``serve`` options of a store: ``kind`` "sqlite" (``target`` a file) or "pgstac"
    (``target`` a DSN)."""
    return ["--db", target] if kind == "sqlite" else ["--dsn", target]


def serve_command(
    store: list[str], index_dir: Path, port: int, write_token: str | None = None
) -> list[str]:
    """``stac-rscbir serve`` (this venv's console script) over ``store`` (``["--db", path]`` or
    ``["--dsn", dsn]``) on loopback ``port``: writes behind ``write_token``, or open to anyone
    without one."""
    exe = str(Path(sys.executable).with_name("stac-rscbir"))
    writes = ["--write-token", write_token] if write_token else ["--allow-anonymous-writes"]
    return [
        *(exe, "serve", *store, "--index-dir", str(index_dir)),
        *("--host", "127.0.0.1", "--port", str(port), *writes),
    ]


class ServeProcess:
    """One ``stac-rscbir serve`` process (its output appended to ``log``); :meth:`start` runs it
    and waits until it answers, :meth:`stop` ends it (SIGTERM: its shutdown saves the indexes),
    :meth:`kill` with SIGKILL."""

    def __init__(
        self,
        store: list[str],
        index_dir: Path,
        log: Path,
        write_token: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.timeout = timeout
        self.command = serve_command(store, index_dir, self.port, write_token)
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> ServeProcess:
        """Start the process without waiting (several servers start side by side)."""
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        return self

    def wait(self) -> ServeProcess:
        """Wait until the launched server answers (RuntimeError with its log otherwise; the
        process is then stopped)."""
        assert self.proc is not None, "launch() first"
        try:
            wait_until_up(self.url, self.proc, self.timeout, self.log)
        except BaseException:
            self.kill()
            raise
        return self

    def start(self) -> ServeProcess:
        return self.launch().wait()

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
