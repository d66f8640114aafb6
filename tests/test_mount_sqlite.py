"""SQLite on the mount (docs/mount.md, "SQLite"): real processes, python's sqlite3.

* WAL (journal_mode=WAL maps the `-shm` file shared and writable, so it needs
  shared mappings): a writer and a reader process on one mount.
* The rollback journal (journal_mode=DELETE: byte-range locks and plain reads
  and writes): a writer on one mount and a reader on another, the locks and
  the pages both coming through the host.

In both, after each committed transaction the reader's next read transaction
sees it; while the writer commits a burst, every read transaction the
reader makes is a consistent snapshot (row count = the counter = the
highest row, every payload intact) and never older than the one before; and
the file passes `PRAGMA integrity_check` on the mount and, opened directly,
on the host afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import sys

import pytest

from tests.conftest import Child
from tests.test_mount import WAIT, mount_guest  # noqa: F401

ACTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sqlite_actor.py")


class Sql:
    """tests/sqlite_actor.py in a child process."""

    def __init__(self, path: str, mode: str, name: str):
        self.child = Child([sys.executable, ACTOR, path, mode], name)
        self.mode = self.child.line(WAIT).split()[1]

    def send(self, command: str) -> None:
        self.child.proc.stdin.write((command + "\n").encode())
        self.child.proc.stdin.flush()

    def answer(self, timeout: float = WAIT) -> str:
        return self.child.line(timeout).strip()

    def ask(self, command: str, timeout: float = WAIT) -> str:
        self.send(command)
        return self.answer(timeout)


@pytest.fixture
def sql():
    started: list[Sql] = []

    def start(path: str, mode: str, name: str) -> Sql:
        actor = Sql(path, mode, name)
        started.append(actor)
        return actor

    yield start
    for actor in started:
        actor.child.stop()


def _exercise(writer: Sql, reader: Sql) -> int:
    for k in range(1, 11):  # lockstep: each commit is seen by the next read
        assert writer.ask(f"write {k}") == "OK"
        assert reader.ask("read") == f"{k} {k} {k}", k
    writer.send("burst 50")  # and concurrently: consistent snapshots, never older
    reader.send("scan 50")
    scanned = reader.answer(120)
    burst = writer.answer(120)
    assert scanned.startswith("OK"), scanned
    assert burst == "OK 60", burst
    assert reader.ask("read") == "60 60 60"
    assert writer.ask("check") == "ok" and reader.ask("check") == "ok"
    assert reader.ask("close") == "OK" and writer.ask("close") == "OK"
    return 60


def _check_on_the_host(path) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*), max(k) FROM t").fetchone() == (60, 60)
        assert db.execute("SELECT last FROM meta").fetchone()[0] == 60
    finally:
        db.close()


def test_sqlite_wal_writer_and_reader_on_one_mount(export, start_host, mount_guest, sql):
    _, address = start_host(export)
    g = mount_guest(address, "g")
    writer = sql(g.path("w.db"), "wal", "writer")
    assert writer.mode == "wal"  # the -shm mapping worked (ENODEV before)
    reader = sql(g.path("w.db"), "wal", "reader")
    assert reader.mode == "wal"
    _exercise(writer, reader)
    _check_on_the_host(export / "w.db")


def test_sqlite_rollback_journal_writer_and_reader_on_two_mounts(export, start_host,
                                                                  mount_guest, sql):
    _, address = start_host(export)
    a = mount_guest(address, "a")
    b = mount_guest(address, "b")
    writer = sql(a.path("r.db"), "delete", "writer")
    reader = sql(b.path("r.db"), "delete", "reader")
    assert writer.mode == reader.mode == "delete"
    _exercise(writer, reader)
    _check_on_the_host(export / "r.db")

