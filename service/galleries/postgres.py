"""The PostgreSQL gallery store: the system of record that every replica shares.

Tables as in `embedded.py` (one row per item, tombstones for deletes, a per-gallery `last_seq`
whose row lock serialises that gallery's writers, so seq order is commit order). A write commits
its rows and a `NOTIFY metalora_gallery, 'name@version:last_seq'` in one transaction before the
service answers. Each replica listens on one dedicated connection; on every (re)connect, and
every `resync_s` as a safety net, it asks for each gallery's `last_seq` and catches up, so a
notification missed while disconnected never leaves it stale.

Connections come from a psycopg 3 pool that checks a connection before lending it (a database
restart leaves dead connections behind). A database that cannot be reached within `timeout_s`
raises `StoreUnavailable` (the service answers 503 with Retry-After), and the pool and the
listener reconnect by themselves when it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from metalora.refs import AdapterRef

from .embedded import source_of, split_key
from .store import AbstractStore, Change, Item, Seed, Snapshot, StoreUnavailable, UnknownItems, from_blobs, to_blob

log = logging.getLogger("metalora.galleries")

CHANNEL = "metalora_gallery"
RETRY_S = 0.2  # a failed catch-up is tried again this soon (the periodic resync is only the last safety net)
_SCHEMA_LOCK = 0x6D6C6F7261  # advisory lock id: replicas starting together create the tables once

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metalora_galleries (
    adapter text NOT NULL, version text NOT NULL,
    last_seq bigint NOT NULL, seed_seq bigint, seed_source text,
    PRIMARY KEY (adapter, version));
CREATE TABLE IF NOT EXISTS metalora_gallery_items (
    adapter text NOT NULL, version text NOT NULL, item_id text NOT NULL,
    label text, embedding bytea, seq bigint NOT NULL, updated timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (adapter, version, item_id));
CREATE INDEX IF NOT EXISTS metalora_gallery_items_seq ON metalora_gallery_items (adapter, version, seq);
"""

_UPSERT = (
    "INSERT INTO metalora_gallery_items (adapter, version, item_id, label, embedding, seq, updated) VALUES (%s, %s, %s, %s, %s, %s, now()) "
    "ON CONFLICT (adapter, version, item_id) DO UPDATE SET label=excluded.label, embedding=excluded.embedding, seq=excluded.seq, updated=now()"
)

_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class PostgresStore(AbstractStore):
    """Galleries in PostgreSQL at `dsn` (libpq connection string or URI)."""

    shared = True

    def __init__(self, dsn: str, pool_size: int = 4, timeout_s: float = 2.0, resync_s: float = 10.0):
        self.dsn, self.timeout_s, self.resync_s = dsn, timeout_s, resync_s
        connect = {"connect_timeout": max(1, round(timeout_s)), "application_name": "metalora-serve"}
        self._connect = connect
        self.pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, timeout=timeout_s, open=False, check=ConnectionPool.check_connection, kwargs=connect, name="metalora-gallery")
        self.pool.open(wait=False)  # start even while the database is down; requests then get 503
        self._schema = False
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self.listening = threading.Event()

    @contextmanager
    def _tx(self):
        try:
            with self.pool.connection() as conn:  # commits on a clean exit, rolls back on an exception
                if not self._schema:
                    self._create_schema(conn)
                yield conn
        except _DOWN as e:
            raise StoreUnavailable(f"gallery database unreachable: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e

    def _create_schema(self, conn) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(_SCHEMA)
        self._schema = True

    def open(self, key: str, dim: int, seed: Callable[[], Seed | None]) -> Snapshot:
        a, v = split_key(key)
        seeded = False
        with self._tx() as conn:
            conn.execute("INSERT INTO metalora_galleries (adapter, version, last_seq) VALUES (%s, %s, 0) ON CONFLICT DO NOTHING", (a, v))
            last, seed_seq, seed_source = conn.execute("SELECT last_seq, seed_seq, seed_source FROM metalora_galleries WHERE adapter=%s AND version=%s FOR UPDATE", (a, v)).fetchone()
            if seed_seq is None:  # the first replica to open it imports the bundle's gallery; the others wait on the row lock
                s = seed()
                n = len(s.ids) if s else 0
                if n:
                    with conn.cursor().copy("COPY metalora_gallery_items (adapter, version, item_id, label, embedding, seq) FROM STDIN (FORMAT BINARY)") as cp:
                        cp.set_types(["text", "text", "text", "text", "bytea", "int8"])
                        for j, (i, lab, vec) in enumerate(zip(s.ids, s.labels, s.vectors)):
                            cp.write_row((a, v, i, lab, to_blob(vec), last + 1 + j))
                last, seed_seq, seed_source, seeded = last + n, last + n, (s.source if s else "none"), True
                conn.execute("UPDATE metalora_galleries SET last_seq=%s, seed_seq=%s, seed_source=%s WHERE adapter=%s AND version=%s", (last, seed_seq, seed_source, a, v))
            cur = conn.cursor(binary=True)
            rows = cur.execute("SELECT item_id, label, embedding FROM metalora_gallery_items WHERE adapter=%s AND version=%s AND embedding IS NOT NULL ORDER BY seq", (a, v)).fetchall()
        ids, labels, blobs = (list(c) for c in zip(*rows)) if rows else ([], [], [])
        vectors = from_blobs(blobs, dim, key)
        return Snapshot(ids, labels, vectors, last, source_of(last, seed_seq, seed_source, len(ids)), seeded)

    def put(self, key: str, items: list[Item]) -> list[Change]:
        a, v = split_key(key)
        with self._tx() as conn:
            last = _bump(conn, a, v, len(items), key)
            first = last - len(items) + 1
            with conn.cursor() as cur:
                cur.executemany(_UPSERT, [(a, v, it.id, it.label, to_blob(it.vector), first + j) for j, it in enumerate(items)])
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{key}:{last}"))
        return [Change(first + j, it.id, it.label, it.vector) for j, it in enumerate(items)]

    def delete(self, key: str, ids: list[str]) -> list[Change]:
        a, v = split_key(key)
        with self._tx() as conn:
            last = _bump(conn, a, v, len(ids), key)  # lock the gallery first, then look
            live = {r[0] for r in conn.execute("SELECT item_id FROM metalora_gallery_items WHERE adapter=%s AND version=%s AND item_id = ANY(%s) AND embedding IS NOT NULL", (a, v, ids))}
            missing = [i for i in ids if i not in live]
            if missing:
                raise UnknownItems(missing)  # rolls back, last_seq included
            first = last - len(ids) + 1
            with conn.cursor() as cur:
                cur.executemany(
                    "UPDATE metalora_gallery_items SET label=NULL, embedding=NULL, seq=%s, updated=now() WHERE adapter=%s AND version=%s AND item_id=%s",
                    [(first + j, a, v, i) for j, i in enumerate(ids)],
                )
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{key}:{last}"))
        return [Change(first + j, i, None, None) for j, i in enumerate(ids)]

    def changes(self, key: str, after: int, upto: int | None = None) -> list[Change]:
        a, v = split_key(key)
        with self._tx() as conn:
            cur = conn.cursor(binary=True)
            rows = cur.execute(
                "SELECT seq, item_id, label, embedding FROM metalora_gallery_items WHERE adapter=%s AND version=%s AND seq>%s AND seq<=%s ORDER BY seq",
                (a, v, after, upto if upto is not None else 2**62),
            ).fetchall()
        out = []
        for s, i, lab, e in rows:
            out.append(Change(s, i, lab, from_blobs([bytes(e)], len(e) // 4, key)[0] if e is not None else None))
        return out

    def last_seqs(self) -> dict[str, int]:
        """Every gallery's last_seq (one cheap query; the listener's catch-up starts here)."""
        with self._tx() as conn:
            return {AdapterRef.key_of(a, v): s for a, v, s in conn.execute("SELECT adapter, version, last_seq FROM metalora_galleries")}

    # ------------------------------------------------------------------ following other replicas
    def follow(self, on_change: Callable[[str, int], None], keys: Callable[[], list[str]]) -> None:
        if self._listener is None:
            self._listener = threading.Thread(target=self._listen, args=(on_change, keys), name="gallery-listen", daemon=True)
            self._listener.start()

    def _catch_up(self, on_change, keys, retry: dict[str, int | None]) -> None:
        wanted = set(keys())
        if not wanted:
            return
        for key, seq in self.last_seqs().items():
            if key in wanted:
                _notify(on_change, key, seq, retry)

    def _listen(self, on_change, keys) -> None:
        backoff = 0.1
        retry: dict[str, int | None] = {}  # catch-ups that failed (pool timeout, DB blip): retried within RETRY_S, not at the next resync
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, **self._connect) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    self._catch_up(on_change, keys, retry)  # what happened while we were away
                    backoff, next_sync = 0.1, time.monotonic() + self.resync_s
                    while not self._stop.is_set():
                        # psycopg >= 3.3 queues notifications that arrive between these calls (while a
                        # catch-up runs, or during the SELECT 1 below) and yields them here, so none is lost.
                        for n in conn.notifies(timeout=RETRY_S if retry else 1.0, stop_after=256):
                            key, _, seq = n.payload.rpartition(":")
                            _notify(on_change, key, int(seq) if seq.isdigit() else None, retry)
                            if retry:  # a failed catch-up: stop waiting out the 1 s timeout chosen before it, retry within RETRY_S
                                break
                        _retry(on_change, retry)
                        if time.monotonic() >= next_sync:
                            conn.execute("SELECT 1")  # notices a dead connection even when nothing is written
                            self._catch_up(on_change, keys, retry)
                            next_sync = time.monotonic() + self.resync_s
            except (psycopg.Error, StoreUnavailable) as e:
                if self._stop.is_set():
                    break
                self.listening.clear()
                log.warning("gallery listener disconnected (%s); reconnecting in %.1f s", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        self.listening.clear()

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=self.resync_s + 5)
        self.pool.close()


def _notify(on_change, key: str, seq: int | None, retry: dict[str, int | None]) -> None:
    """Hand a change to the service; a failure is logged and the key goes to `retry` (tried again within RETRY_S)."""
    try:
        on_change(key, seq)
    except Exception as e:  # noqa: BLE001 - the listener thread must outlive any one gallery's trouble
        if key not in retry:
            log.warning("gallery catch-up of %s failed (%s); retrying in %.1f s", key, getattr(e, "message", e), RETRY_S)
        old = retry.get(key, seq)
        retry[key] = None if old is None or seq is None else max(old, seq)


def _retry(on_change, retry: dict[str, int | None]) -> None:
    """Try the failed catch-ups again; those that fail stay (logged once, when they first failed)."""
    for key, seq in list(retry.items()):
        try:
            on_change(key, seq)
        except Exception:  # noqa: BLE001, S112 - still down; the next round tries again (its first failure was logged)
            continue
        retry.pop(key, None)
        log.info("gallery catch-up of %s succeeded on retry", key)


def _bump(conn, a: str, v: str, n: int, key: str) -> int:
    row = conn.execute("UPDATE metalora_galleries SET last_seq = last_seq + %s WHERE adapter=%s AND version=%s RETURNING last_seq", (n, a, v)).fetchone()
    if row is None:
        raise RuntimeError(f"gallery {key} written before it was opened")
    return row[0]
