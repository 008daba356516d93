"""One loopback Prefect server for the cluster (``prefect: embedded``).

``PrefectServer(state_dir).start()`` runs ``python -m prefect server start`` in its own process
group on a free loopback port, with its SQLite database at ``<state_dir>/prefect/prefect.db``
(``PREFECT_HOME`` is ``<state_dir>/prefect``) and its output in
``<state_dir>/logs/prefect-server.log``, and returns once ``/api/health`` answers.
``stop()`` sends SIGTERM to the group, then SIGKILL after ``stop_timeout``. It is also a
context manager, and an ``atexit`` hook stops it if the owner forgets.

Measured on the 2-core dev box: ~8 s to healthy on a fresh database (about 3 s of it are the
Alembic migrations), ~3.3 s on an existing one (mostly importing the server); serving the UI
costs nothing measurable, so it is on. ``template_db`` removes the migration cost from fresh
state dirs: when the database does not exist yet, the template is copied in; when the
template does not exist, the freshly migrated database is saved as the template.

The server never sees the caller's ``PREFECT_API_URL`` (the UI would point at it), runs
with analytics off, and does not need the caller's Prefect profile.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from actors.errors import ListenerError

LOG_TAIL_LINES = 40


class PrefectServerError(ListenerError):
    """The embedded Prefect server did not start (the message carries its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class PrefectServer:
    """A Prefect server subprocess owned by this object."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        ui: bool = True,
        startup_timeout: float = 90.0,
        stop_timeout: float = 10.0,
        template_db: str | os.PathLike[str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.home = self.state_dir / "prefect"
        self.db_path = self.home / "prefect.db"
        self.log_path = self.state_dir / "logs" / "prefect-server.log"
        self.host = host
        self.port = port
        self.ui = ui
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.template_db = Path(template_db) if template_db else None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise PrefectServerError("the Prefect server has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """What ``PREFECT_API_URL`` should be for workers."""
        return f"{self.base_url}/api"

    @property
    def ui_url(self) -> str:
        return self.base_url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> PrefectServer:
        """Start the server and wait until it is healthy; raise PrefectServerError if not."""
        if self.is_running():
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fresh_db = not self.db_path.exists()
        if fresh_db and self.template_db is not None and self.template_db.is_file():
            shutil.copyfile(self.template_db, self.db_path)
            fresh_db = False
        started = time.monotonic()
        fixed_port = self.port is not None
        for _ in range(1 if fixed_port else 3):  # a picked port can be taken before we bind
            if not fixed_port:
                self.port = free_port(self.host)
            self._spawn()
            if self._wait_healthy(started):
                break
            if fixed_port or "already in use" not in tail(self.log_path, 5).lower():
                self._fail("exited during startup")
        else:
            self._fail("could not bind a free port")
        self.startup_seconds = time.monotonic() - started
        atexit.register(self.stop)
        if fresh_db and self.template_db is not None and not self.template_db.exists():
            self._save_template()
        return self

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE")
            and not k.startswith(("PREFECT_SERVER_API_", "PREFECT_UI_"))
        }
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.db_path}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="true" if self.ui else "false",
            PREFECT_SERVER_EPHEMERAL_ENABLED="false",
            PYTHONUNBUFFERED="1",
            COLUMNS="200",  # the CLI's rich console wraps its messages otherwise
        )
        return env

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "prefect", "server", "start"]
        cmd += ["--host", self.host, "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%F %T')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                env=self._env(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() signals all of it
            )

    def _wait_healthy(self, started: float) -> bool:
        """True once /api/health answers; False if the process exits first."""
        url = f"{self.api_url}/health"
        while time.monotonic() - started < self.startup_timeout:
            if self._proc is None or self._proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=2) as resp,
            ):
                if resp.status == 200:
                    return True
            time.sleep(0.1)
        self._fail(f"was not healthy after {self.startup_timeout:.0f} s")
        return False  # unreachable: _fail raises

    def _fail(self, what: str) -> None:
        code = self._proc.poll() if self._proc else None
        self.stop()
        status = f" (exit code {code})" if code is not None else ""
        raise PrefectServerError(
            f"Prefect server on {self.host}:{self.port} {what}{status}; "
            f"log {self.log_path}, last lines:\n{tail(self.log_path)}"
        )

    def _save_template(self) -> None:
        """Copy the migrated database (consistently, while the server runs) as the template."""
        assert self.template_db is not None
        self.template_db.parent.mkdir(parents=True, exist_ok=True)
        partial = self.template_db.with_name(f"{self.template_db.name}.{os.getpid()}.tmp")
        with contextlib.suppress(sqlite3.Error, OSError):
            src = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
            os.replace(partial, self.template_db)
        with contextlib.suppress(OSError):
            partial.unlink()

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``stop_timeout``."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
