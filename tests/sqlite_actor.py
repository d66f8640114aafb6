"""An SQLite application process, driven by lines (tests/test_mount_sqlite.py).

`python tests/sqlite_actor.py DB JOURNAL_MODE` opens DB with python's sqlite3,
sets the journal mode (answers `MODE <mode>`), creates the tables if they are
not there, then answers one line per command:

  write K     one transaction: insert row K (a 3 KiB payload that names K) and
              set meta.last = K                                  -> OK
  burst N     N more such transactions, one after another         -> OK <last>
  read        one read transaction: `<rows> <meta.last> <max row>` and checks
              every payload names its row                         -> <n> <last> <max>
  scan N      N read transactions; each must be consistent (rows == last ==
              max row, payloads intact) and none older than the one before
                                                                  -> OK <first> <last>
  check       PRAGMA integrity_check                              -> ok
  close       close the connection                                -> OK

A failed check answers `BAD <what>`; an exception `ERR <it>`.
"""

from __future__ import annotations

import sqlite3
import sys


def payload(k: int) -> str:
    return (f"row {k:08d};" * 300)[:3000]


class Actor:
    def __init__(self, path: str, mode: str):
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.mode = self.db.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]
        self.db.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY, last INTEGER)")
        self.db.execute("INSERT OR IGNORE INTO meta VALUES (1, 0)")
        self.last = self.db.execute("SELECT last FROM meta").fetchone()[0]

    def write(self, k: int) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO t VALUES (?, ?)", (k, payload(k)))
        self.db.execute("UPDATE meta SET last = ? WHERE id = 1", (k,))
        self.db.execute("COMMIT")
        self.last = k

    def read(self) -> tuple[int, int, int]:
        self.db.execute("BEGIN")
        try:
            rows, top = self.db.execute("SELECT count(*), coalesce(max(k), 0) FROM t").fetchone()
            last = self.db.execute("SELECT last FROM meta").fetchone()[0]
            for k, v in self.db.execute("SELECT k, v FROM t"):
                if v != payload(k):
                    raise ValueError(f"row {k}'s payload is torn: {v[:40]!r}")
        finally:
            self.db.execute("COMMIT")
        return rows, last, top


def main(path: str, mode: str) -> int:
    actor = Actor(path, mode)
    print(f"MODE {actor.mode}", flush=True)
    for line in sys.stdin:
        words = line.split()
        try:
            match words:
                case ["write", k]:
                    actor.write(int(k))
                    answer = "OK"
                case ["burst", n]:
                    for _ in range(int(n)):
                        actor.write(actor.last + 1)
                    answer = f"OK {actor.last}"
                case ["read"]:
                    answer = "%d %d %d" % actor.read()
                case ["scan", n]:
                    first = previous = None
                    answer = None
                    for _ in range(int(n)):
                        rows, last, top = actor.read()
                        if not rows == last == top:
                            answer = f"BAD torn snapshot: {rows} rows, last {last}, max {top}"
                            break
                        if previous is not None and last < previous:
                            answer = f"BAD went back from {previous} to {last}"
                            break
                        first = last if first is None else first
                        previous = last
                    answer = answer or f"OK {first} {previous}"
                case ["check"]:
                    answer = actor.db.execute("PRAGMA integrity_check").fetchone()[0]
                case ["close"]:
                    actor.db.close()
                    answer = "OK"
                case _:
                    answer = "ERR unknown command"
        except (sqlite3.Error, ValueError) as exc:
            answer = f"ERR {type(exc).__name__}: {exc}"
        print(answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
