"""The embedded gallery store: one SQLite database in WAL mode beside the galleries, no server.

Why SQLite and not a hand-written append-only log: a commit in WAL mode with `synchronous=FULL`
appends the change to the write-ahead log and fsyncs it before returning, which is exactly an
fsync'ed change log (an acknowledged write survives `kill -9` and power loss), and SQLite brings
what a home-made log would have to grow: atomic batches, torn-tail recovery, and compaction (the
WAL is checkpointed into the table, and a replaced item overwrites its row, so the file stays
the size of the gallery, not of its history). The tables and the seq rule are the PostgreSQL
store's, so one test suite covers both (tests/test_gallery_store.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from metalora.refs import AdapterRef

from .store import AbstractStore, Change, Item, Seed, Snapshot, StoreReadOnly, StoreUnavailable, UnknownItems, from_blobs, to_blob

log = logging.getLogger("metalora.galleries")

FILENAME = "galleries.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metalora_galleries (
    adapter TEXT NOT NULL, version TEXT NOT NULL,
    last_seq INTEGER NOT NULL, seed_seq INTEGER, seed_source TEXT,
    PRIMARY KEY (adapter, version));
CREATE TABLE IF NOT EXISTS metalora_gallery_items (
    adapter TEXT NOT NULL, version TEXT NOT NULL, item_id TEXT NOT NULL,
    label TEXT, embedding BLOB, seq INTEGER NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (adapter, version, item_id));
CREATE INDEX IF NOT EXISTS metalora_gallery_items_seq ON metalora_gallery_items (adapter, version, seq);
"""


def split_key(key: str) -> tuple[str, str]:
    """A loaded version's key (`name@version`) -> (name, version), as the tables store them."""
    return AdapterRef.split(key)


def source_of(last_seq: int, seed_seq: int, seed_source: str, live: int) -> str:
    if last_seq > seed_seq:
        return "edited"
    return seed_source if live else "none"


class EmbeddedStore(AbstractStore):
    """Galleries in `<directory>/galleries.sqlite3` (one file for every adapter version)."""

    shared = False

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / FILENAME
        self._lock = threading.Lock()
        self.read_only: str | None = None  # why writes are refused, when they are
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection guarded by a lock: writes serialise on the WAL anyway, and each commit's
            # fsync dominates its cost. isolation_level=None: transactions are explicit below.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:  # a read-only store: serve the bundles' galleries, refuse edits
            self._db, self.read_only = None, f"the gallery directory {self.path.parent} is not writable ({e})"
            log.warning("gallery edits disabled: %s; set METALORA_GALLERY_DIR or METALORA_GALLERY_DSN", self.read_only)

    @contextmanager
    def _tx(self, immediate: bool = True):
        if self._db is None:
            raise StoreReadOnly(self.read_only)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:  # disk full, I/O error, locked by another process
                raise StoreUnavailable(f"gallery database {self.path}: {e}") from e

    def open(self, key: str, dim: int, seed: Callable[[], Seed | None]) -> Snapshot:
        if self._db is None:  # read-only: the seed is the gallery
            s = seed()
            if s is None:
                return Snapshot([], [], from_blobs([], dim, key), 0, "none")
            return Snapshot(list(s.ids), list(s.labels), s.vectors, len(s.ids), s.source)
        a, v = split_key(key)
        seeded = False
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO metalora_galleries (adapter, version, last_seq) VALUES (?, ?, 0)", (a, v))
            last, seed_seq, seed_source = db.execute("SELECT last_seq, seed_seq, seed_source FROM metalora_galleries WHERE adapter=? AND version=?", (a, v)).fetchone()
            if seed_seq is None:
                s = seed()
                n = len(s.ids) if s else 0
                if n:
                    now = time.time()
                    rows = ((a, v, i, lab, to_blob(vec), last + 1 + j, now) for j, (i, lab, vec) in enumerate(zip(s.ids, s.labels, s.vectors)))
                    db.executemany(_UPSERT, rows)
                last, seed_seq, seed_source, seeded = last + n, last + n, (s.source if s else "none"), True
                db.execute("UPDATE metalora_galleries SET last_seq=?, seed_seq=?, seed_source=? WHERE adapter=? AND version=?", (last, seed_seq, seed_source, a, v))
            rows = db.execute("SELECT item_id, label, embedding FROM metalora_gallery_items WHERE adapter=? AND version=? AND embedding IS NOT NULL ORDER BY seq", (a, v)).fetchall()
        ids, labels, blobs = (list(c) for c in zip(*rows)) if rows else ([], [], [])
        vectors = from_blobs(blobs, dim, key)
        return Snapshot(ids, labels, vectors, last, source_of(last, seed_seq, seed_source, len(ids)), seeded)

    def put(self, key: str, items: list[Item]) -> list[Change]:
        a, v = split_key(key)
        with self._tx() as db:
            last = _bump(db, a, v, len(items), key)
            first, now = last - len(items) + 1, time.time()
            db.executemany(_UPSERT, [(a, v, it.id, it.label, to_blob(it.vector), first + j, now) for j, it in enumerate(items)])
        return [Change(first + j, it.id, it.label, it.vector) for j, it in enumerate(items)]

    def delete(self, key: str, ids: list[str]) -> list[Change]:
        a, v = split_key(key)
        with self._tx() as db:
            q = ",".join("?" * len(ids))
            live = {r[0] for r in db.execute(f"SELECT item_id FROM metalora_gallery_items WHERE adapter=? AND version=? AND item_id IN ({q}) AND embedding IS NOT NULL", (a, v, *ids))}
            missing = [i for i in ids if i not in live]
            if missing:
                raise UnknownItems(missing)
            last = _bump(db, a, v, len(ids), key)
            first, now = last - len(ids) + 1, time.time()
            db.executemany(
                "UPDATE metalora_gallery_items SET label=NULL, embedding=NULL, seq=?, updated=? WHERE adapter=? AND version=? AND item_id=?",
                [(first + j, now, a, v, i) for j, i in enumerate(ids)],
            )
        return [Change(first + j, i, None, None) for j, i in enumerate(ids)]

    def changes(self, key: str, after: int, upto: int | None = None) -> list[Change]:
        a, v = split_key(key)
        with self._tx(immediate=False) as db:
            rows = db.execute(
                "SELECT seq, item_id, label, embedding FROM metalora_gallery_items WHERE adapter=? AND version=? AND seq>? AND seq<=? ORDER BY seq",
                (a, v, after, upto if upto is not None else 2**62),
            ).fetchall()
            dim = _dim_of(rows)
        return [Change(s, i, lab, from_blobs([e], dim, key)[0] if e is not None else None) for s, i, lab, e in rows]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()


_UPSERT = (
    "INSERT INTO metalora_gallery_items (adapter, version, item_id, label, embedding, seq, updated) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (adapter, version, item_id) DO UPDATE SET label=excluded.label, embedding=excluded.embedding, seq=excluded.seq, updated=excluded.updated"
)


def _bump(db, a: str, v: str, n: int, key: str) -> int:
    row = db.execute("UPDATE metalora_galleries SET last_seq = last_seq + ? WHERE adapter=? AND version=? RETURNING last_seq", (n, a, v)).fetchone()
    if row is None:
        raise RuntimeError(f"gallery {key} written before it was opened")
    return row[0]


def _dim_of(rows) -> int:
    for r in rows:
        if r[3] is not None:
            return len(r[3]) // 4
    return 0
