"""Real streaming replicas made on this machine, for the replica-lag tests.

:func:`pg_pair` initdb's a PostgreSQL primary in a temporary directory, makes a replica of it
with ``pg_basebackup -R`` and starts both; :func:`mariadb_pair` installs a MariaDB primary
(binary log on) and a replica, and starts replication between them. Both run on free ports
of their own, as the server's own user, and are torn down (stopped, directories removed) when
the context ends. The shared servers on 5432 and 3306 are never touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("RETENTION_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user(user: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    command = list(args)
    if os.geteuid() == 0:  # CI runs as root; the servers refuse to
        command = ["runuser", "-u", user, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed ({result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-2000:]}")
    return result


def _install_mariadb(data: Path, root: Path, attempts: int = 3) -> None:
    """A new MariaDB data directory. ``--no-defaults``: not the machine server's my.cnf (its
    error log, its /tmp), so a failure is told here; the bootstrap's temporary tables go to
    this pair's own directory. MariaDB 10.11's bootstrap was seen to fail once in a while
    ('Could not remove temporary table ... Unknown table mysql.tmp_user_sys'): it is tried
    again on a clean directory, and the last failure is raised with its output."""
    for attempt in range(attempts):
        shutil.rmtree(data, ignore_errors=True)
        try:
            _as_user("mysql", "mariadb-install-db", "--no-defaults", f"--datadir={data}", f"--tmpdir={root}",
                     "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve",
                     cwd=str(root))
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise


def _need(program: str, package: str) -> None:
    if not (Path(program).is_file() if "/" in program else shutil.which(program)):
        raise RuntimeError(f"the replica tests need {program}: apt-get install {package}")


@dataclass(frozen=True)
class Server:
    """One server of a pair: where it listens and how to connect."""

    port: int
    url: str
    """A SQLAlchemy URL."""
    uri: str
    """An Airflow connection URI."""


@dataclass(frozen=True)
class Pair:
    primary: Server
    replica: Server


def _workdir(prefix: str, user: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, user, user)
    return root


@contextmanager
def pg_pair() -> Iterator[Pair]:
    """A PostgreSQL primary and its streaming replica, both started; stopped and removed after."""
    _need(str(PG_BIN / "initdb"), "postgresql-15")
    root = _workdir("lag-pg-", "postgres")
    primary, replica = root / "primary", root / "replica"
    ports = free_port(), free_port()
    started: list[Path] = []
    try:
        _as_user("postgres", str(PG_BIN / "initdb"), "-D", str(primary), "-A", "trust", "-U", "postgres",
                 "--no-sync", "-E", "UTF8")
        with open(primary / "postgresql.conf", "a") as conf:
            conf.write(f"port = {ports[0]}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                       "wal_level = replica\nmax_wal_senders = 5\nfsync = off\nsynchronous_commit = off\n"
                       "wal_receiver_status_interval = 1s\nautovacuum = off\n")
        with open(primary / "pg_hba.conf", "a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        _pg_start(primary, root)
        started.append(primary)
        _as_user("postgres", str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(ports[0]), "-U",
                 "postgres", "-D", str(replica), "-R", "-X", "stream", "--no-sync")
        with open(replica / "postgresql.conf", "a") as conf:
            conf.write(f"port = {ports[1]}\nhot_standby = on\nhot_standby_feedback = on\n")
        _pg_start(replica, root)
        started.append(replica)
        servers = [Server(p, f"postgresql+psycopg2://postgres@127.0.0.1:{p}/postgres",
                          f"postgres://postgres@127.0.0.1:{p}/postgres") for p in ports]
        yield Pair(*servers)
    finally:
        for data in reversed(started):
            with suppress(RuntimeError, subprocess.SubprocessError):
                _as_user("postgres", str(PG_BIN / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate", "-w")
        shutil.rmtree(root, ignore_errors=True)


def _pg_start(data: Path, root: Path) -> None:
    _as_user("postgres", str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / f"{data.name}.log"),
             "-w", "-t", "60", "start")


@contextmanager
def mariadb_pair() -> Iterator[Pair]:
    """A MariaDB primary (binary log on) and a replica of it, replicating; stopped and removed after."""
    _need("mariadb-install-db", "mariadb-server")
    _need("mariadbd", "mariadb-server")
    root = _workdir("lag-maria-", "mysql")
    ports = free_port(), free_port()
    processes: list[subprocess.Popen] = []
    try:
        for index, port in enumerate(ports):
            data = root / f"data{index}"
            _install_mariadb(data, root)
            args = ["mariadbd", "--no-defaults", f"--datadir={data}", f"--port={port}", "--bind-address=127.0.0.1",
                    f"--socket={root}/s{index}.sock", f"--pid-file={root}/s{index}.pid", f"--server-id={index + 1}",
                    "--skip-name-resolve", "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=48M",
                    "--innodb-flush-log-at-trx-commit=2", f"--log-error={root}/s{index}.err"]
            if index == 0:
                args += [f"--log-bin={root}/bin", "--binlog-format=ROW"]
            else:
                args += ["--read-only=0", f"--relay-log={root}/relay"]
            if os.geteuid() == 0:
                # The server drops to mysql itself, so the process started is the server (killed below).
                args.insert(2, "--user=mysql")
            processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for index, port in enumerate(ports):
            _wait_mariadb(port, root / f"s{index}.err")
        # Users are made on each server alone (not logged); the database replicates.
        _mariadb_sql(ports[0], "SET sql_log_bin = 0", "CREATE USER 'lag'@'%' IDENTIFIED BY 'lagpw'",
                     "GRANT ALL ON *.* TO 'lag'@'%'", "SET sql_log_bin = 1", "CREATE DATABASE lagtest")
        _mariadb_sql(ports[1], "CREATE USER 'lag'@'%' IDENTIFIED BY 'lagpw'", "GRANT ALL ON *.* TO 'lag'@'%'",
                     f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={ports[0]}, MASTER_USER='lag', "
                     "MASTER_PASSWORD='lagpw', MASTER_USE_GTID=no", "START SLAVE")
        servers = [Server(p, f"mysql+pymysql://lag:lagpw@127.0.0.1:{p}/lagtest",
                          f"mysql://lag:lagpw@127.0.0.1:{p}/lagtest") for p in ports]
        yield Pair(*servers)
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def _mariadb_sql(port: int, *statements: str) -> None:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=port, user="root", password="", autocommit=True)
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        conn.close()


def _wait_mariadb(port: int, log: Path, timeout: float = 60.0) -> None:
    import pymysql

    deadline = time.monotonic() + timeout
    while True:
        try:
            pymysql.connect(host="127.0.0.1", port=port, user="root", password="", connect_timeout=2).close()
            return
        except pymysql.err.OperationalError:
            if time.monotonic() > deadline:
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                raise RuntimeError(f"MariaDB on port {port} did not start:\n{tail}") from None
            time.sleep(0.2)
