"""A throwaway PostgreSQL server for tests: found on the machine or installed from Debian's packages.

Started in a temp directory on a private port, as the `postgres` user when run as root (the
server refuses root), and stopped at the end of the session. CI installs it (apt) when missing;
elsewhere a machine without it skips the PostgreSQL variants with the reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _bin_dir() -> Path | None:
    for pattern in ("/usr/lib/postgresql/*/bin",):
        for candidate in sorted(glob.glob(pattern), reverse=True):
            if Path(candidate, "initdb").exists():
                return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env, capture_output=True)


def available_or_reason() -> tuple[Path | None, str]:
    bin_dir = _bin_dir()
    if bin_dir is None and os.geteuid() == 0 and os.environ.get("CI") == "true":
        _install()
        bin_dir = _bin_dir()
    if bin_dir is None:
        return None, "PostgreSQL is not installed (CI installs it with apt-get)"
    return bin_dir, ""


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh database; remove everything afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ws-pg-"))
    data = root / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True)
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run([*as_user, str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True, check=False)
            if probe.returncode == 0:
                break
            time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
