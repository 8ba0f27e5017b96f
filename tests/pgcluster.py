"""A throwaway PostgreSQL 15 + PostGIS cluster with pgstac migrated, for tests.

The cluster lives in a temporary folder owned by ``postgres`` (``initdb`` refuses to run as
root, so the server binaries run as that user when the tests run as root), listens on a free
loopback port with trust authentication, and is tuned for speed, not durability (no fsync).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_BINDIR = Path(os.environ.get("RSCBIR_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
DATABASE = "pgstac"


class ClusterUnavailable(RuntimeError):
    """The PostgreSQL binaries, PostGIS or pypgstac are not installed here."""


def _postgis_control(bindir: Path) -> Path:
    sharedir = subprocess.run(
        [str(bindir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(sharedir) / "extension" / "postgis.control"


def missing(bindir: Path = PG_BINDIR) -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    if not (bindir / "initdb").is_file():
        return f"PostgreSQL server binaries not found in {bindir} (apt-get install postgresql-15)"
    if not _postgis_control(bindir).is_file():
        return "PostGIS for PostgreSQL 15 not installed (apt-get install postgresql-15-postgis-3)"
    if _pypgstac() is None:
        return "pypgstac not installed (the project's pgstac extra)"
    return None


def _pypgstac() -> str | None:
    here = Path(sys.executable).with_name("pypgstac")
    return str(here) if here.is_file() else shutil.which("pypgstac")


def migrate(dsn: str) -> None:
    """``pypgstac migrate`` the database of ``dsn`` (raises with its output when it fails)."""
    result = subprocess.run(
        [_pypgstac() or "pypgstac", "migrate", "--dsn", dsn],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pypgstac migrate failed ({result.returncode}): {result.stderr}")


def pypgstac_load(dsn: str, table: str, path: Path, method: str) -> None:
    """``pypgstac load TABLE PATH --method METHOD`` into ``dsn``, as an operator would run it:
    behind every API's back (raises with its output when it fails)."""
    result = subprocess.run(
        [_pypgstac() or "pypgstac", "load", table, str(path), "--dsn", dsn, "--method", method],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pypgstac load {table} failed ({result.returncode}): {result.stderr}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    """One running cluster; :meth:`stop` shuts it down and deletes its folder."""

    root: Path
    port: int
    bindir: Path = PG_BINDIR

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _as_postgres(self, *args: str) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)

    def _check(self, what: str, result: subprocess.CompletedProcess[str]) -> None:
        if result.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"{what} failed ({result.returncode}): {result.stderr}\n{tail}")

    def start(self) -> PgCluster:
        """initdb, start the server, create the database and run ``pypgstac migrate``."""
        data = self.root / "data"
        self._check(
            "initdb",
            self._as_postgres(
                str(self.bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ),
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._check(
            "pg_ctl start",
            self._as_postgres(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(self.root / "postgres.log"),
                "-o",
                options,
                "-w",
                "start",
            ),
        )
        self._check(
            "createdb",
            self._as_postgres(
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                DATABASE,
            ),
        )
        migrate(self.dsn)
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove the cluster's folder."""
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(bindir: Path = PG_BINDIR) -> PgCluster:
    """A fresh migrated pgstac cluster in a new temporary folder (raises if one cannot run)."""
    reason = missing(bindir)
    if reason:
        raise ClusterUnavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="rscbir-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    cluster = PgCluster(root, _free_port(), bindir)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
