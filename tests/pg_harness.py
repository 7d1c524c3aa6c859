"""A private PostgreSQL server for tests: ``initdb`` in a temp dir, ``pg_ctl start`` on a free port.

Nothing is mocked: the Debian ``postgresql`` package's own binaries run a
throw-away cluster (trust auth on 127.0.0.1, ``fsync=off`` because the
test's data need not survive a power loss, only a server stop).  initdb
refuses to run as root, so as root the cluster belongs to the ``postgres``
user the package creates and every server command runs through
``runuser -u postgres --``.  `available()` says why not when it cannot
run; tests then skip with that reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import unittest
from typing import List, Optional

from tests.harness import free_port, port_accepts, wait_for

#: Seconds a start or stop may take on a loaded machine.
PG_TIMEOUT = 60.0
USER = "relayd"
DATABASE = "relayd"


def bin_dir() -> Optional[str]:
    """The newest /usr/lib/postgresql/<ver>/bin with initdb, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def available() -> Optional[str]:
    """None when a private server can run here, else the reason it cannot."""
    if bin_dir() is None:
        return "PostgreSQL binaries not installed (Debian package postgresql; scripts/test installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    return None


class PostgresServer:
    """A real PostgreSQL cluster on 127.0.0.1:<free port>, removed at cleanup."""

    def __init__(self, test: unittest.TestCase) -> None:
        reason = available()
        if reason is not None:
            raise unittest.SkipTest(reason)
        self.bin = bin_dir()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="relayd-pg-")
        self.data = os.path.join(self.dir, "data")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        test.addCleanup(shutil.rmtree, self.dir, True)
        test.addCleanup(self._cleanup)
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", USER, "--no-sync", "-E", "UTF8", "--locale=C")
        self.start()
        self.psql("CREATE DATABASE %s" % DATABASE, database="postgres")

    @property
    def url(self) -> str:
        """The ``postgresql://`` URL relayd's config takes."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _argv(self, tool: str, *args: str) -> List[str]:
        argv = [os.path.join(self.bin or "", tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def _run(self, tool: str, *args: str) -> str:
        proc = subprocess.run(self._argv(tool, *args), capture_output=True, text=True, timeout=PG_TIMEOUT, cwd=self.dir)
        if proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc.stdout

    def start(self) -> None:
        """``pg_ctl start`` and wait until it accepts connections."""
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self._run("pg_ctl", "-D", self.data, "-o", opts, "-l", os.path.join(self.dir, "pg.log"), "-w", "-t", "60", "start")
        wait_for(lambda: port_accepts(self.port), PG_TIMEOUT, f"postgres on port {self.port}")

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` (connections are cut, committed data stays)."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def psql(self, sql: str, database: str = DATABASE) -> str:
        """Run `sql` with psql; the unaligned, tuples-only output."""
        return self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", database, "-XAtq", "-c", sql)

    def totals(self, name: str, table: str = "counters") -> dict:
        """``{key: value}`` of one counter in `table`."""
        out = self.psql(f"SELECT key, value FROM {table} WHERE name = '{name}'")
        return {k: int(v) for k, v in (line.split("|") for line in out.splitlines() if line)}

    def _cleanup(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            subprocess.run(self._argv("pg_ctl", "-D", self.data, "-m", "immediate", "stop"), capture_output=True, timeout=PG_TIMEOUT)
