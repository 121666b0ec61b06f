"""A PostgreSQL server started by the test suite itself (session scope), so the search runs on a real database.

initdb into a temporary folder, ``postgres`` on 127.0.0.1 and a free port, stopped and removed at teardown.
PostgreSQL refuses to run as root: under root (CI) the server runs as the ``postgres`` user (or ``nobody``).
Missing server binaries fail the tests with the command that installs them; they are never skipped.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

INSTALL = (
    "PostgreSQL's server binaries (initdb, postgres) were not found: install them (Debian/Ubuntu: "
    "`apt-get install -y postgresql`, Fedora: `dnf install postgresql-server`, macOS: `brew install "
    "postgresql`) or set SLIMKIT_PG_BIN to the folder that holds initdb"
)


def _bindir() -> Path | None:
    candidates = [os.environ.get("SLIMKIT_PG_BIN", "")]
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    # Debian keeps the server binaries off PATH: the newest version first
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += ["/usr/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"]
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    return None


def _as_unprivileged() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that drops root (PostgreSQL will not run as root), and the user it switches to."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"], user
    pytest.fail("running as root and neither the 'postgres' nor the 'nobody' user exists to run PostgreSQL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    import psycopg

    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            pytest.fail(f"PostgreSQL exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not accept connections within {seconds} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres_server():
    """``postgresql://slimkit@127.0.0.1:PORT/postgres`` of a server that lives for the test session."""
    bindir = _bindir()
    if bindir is None:
        pytest.fail(INSTALL)
    prefix, user = _as_unprivileged()
    root = Path(tempfile.mkdtemp(prefix="slimkit-pg-"))
    data, log = root / "data", root / "server.log"
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    init = subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "slimkit",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed ({init.returncode}): {init.stderr[-3000:]}")
    port = _free_port()
    with open(log, "w") as log_file:
        if user is not None:
            os.chown(log, user.pw_uid, user.pw_gid)
        # fsync off: a test database need not survive a power cut; the socket lives in the temporary folder
        server = subprocess.Popen(
            [
                *prefix,
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-k",
                str(root),
                "-F",
                "-c",
                "max_connections=60",
            ],
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"postgresql://slimkit@127.0.0.1:{port}/postgres"
    try:
        _wait_ready(url, server, log)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown: disconnects clients, then exits
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server: ``postgresql://slimkit@127.0.0.1:PORT/test_<id>``."""
    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.rsplit("/", 1)[0] + f"/{name}"
