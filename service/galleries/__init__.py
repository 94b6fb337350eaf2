"""Galleries at scale: O(1) in-place index edits, and a store behind one narrow interface.

- `index.LiveIndex`: one gallery's FAISS index edited in place, background compaction.
- `store.AbstractStore`: the operations; `embedded.EmbeddedStore` (SQLite, the default) and
  `postgres.PostgresStore` (shared by replicas, `METALORA_GALLERY_DSN`).
- `manager.Galleries`: the service's loaded galleries kept in step with the store.
"""

from __future__ import annotations

from pathlib import Path

from .embedded import EmbeddedStore
from .index import GalleryEmpty, Hit, LiveIndex
from .store import AbstractStore, Change, Item, Seed, Snapshot, StoreReadOnly, StoreUnavailable, UnknownItems


def open_store(directory: str | Path, dsn: str | None = None, timeout_s: float = 2.0, pool_size: int = 4) -> AbstractStore:
    """PostgreSQL when a DSN is given, else the embedded SQLite store in `directory`."""
    if dsn:
        from .postgres import PostgresStore  # psycopg is only needed with a database

        return PostgresStore(dsn, pool_size=pool_size, timeout_s=timeout_s)
    return EmbeddedStore(directory)


__all__ = ["AbstractStore", "Change", "EmbeddedStore", "GalleryEmpty", "Hit", "Item", "LiveIndex", "Seed", "Snapshot", "StoreReadOnly", "StoreUnavailable", "UnknownItems", "open_store"]
