"""The gallery store: the operations every backend offers (STYLE.md item 14), and their data.

A store holds, per adapter version ("name@version"), one row per item ever written:
(id, label, embedding, seq). A delete keeps the row as a tombstone (no label, no embedding), so a
replica catching up learns of it and a deleted item never comes back. `seq` numbers the changes
of one gallery 1, 2, 3, ... in commit order: writers of one gallery are serialised by a lock on
the gallery's row (`last_seq`), so a reader that has applied changes up to `cursor` and then sees
change `cursor + 1` knows it missed nothing, and when it sees a larger one it fetches the gap with
`changes(key, cursor, upto)`. The bundle's own gallery is imported once, as the first changes.

Backends: `EmbeddedStore` (SQLite beside the galleries directory, the zero-set-up default) and
`PostgresStore` (the system of record shared by every replica). Both raise
`StoreUnavailable` when the database cannot be reached, which the service answers with 503 and
Retry-After.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One gallery item as written: id, label (one of the adapter's labels), vector (D,) float32."""

    id: str
    label: str
    vector: np.ndarray


@dataclass(frozen=True)
class Change:
    """One committed change: an upsert (label and vector set) or a delete (both None)."""

    seq: int
    id: str
    label: str | None
    vector: np.ndarray | None  # (D,) float32

    @property
    def deleted(self) -> bool:
        return self.vector is None


@dataclass
class Seed:
    """The items a gallery starts from (the bundle's gallery): ids, labels, vectors (N, D)."""

    ids: list[str]
    labels: list[str]
    vectors: np.ndarray  # (N, D) float32
    source: str = "bundle"


@dataclass
class Snapshot:
    """A gallery's live items at change `cursor`."""

    ids: list[str]
    labels: list[str]
    vectors: np.ndarray  # (N, D) float32
    cursor: int
    source: str  # "bundle" (only the seed), "edited" (changed since), "none" (no seed, no items)
    seeded: bool = field(default=False)  # this call imported the seed


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or failed mid-transaction; the write did not happen (or is unknown)."""


class StoreReadOnly(RuntimeError):
    """The store cannot be written here (e.g. the gallery directory is on a read-only filesystem)."""


class UnknownItems(KeyError):
    """A delete named ids the gallery does not hold; nothing was deleted."""

    def __init__(self, ids: list[str]):
        super().__init__(ids)
        self.ids = ids


def to_blob(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def from_blobs(blobs: list[bytes], dim: int, key: str) -> np.ndarray:
    """Stored vectors -> (N, D) float32; ValueError when one has the wrong length."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    if any(len(b) != 4 * dim for b in blobs):
        raise ValueError(f"{key}: stored vectors are not {dim}-dimensional")
    out = np.empty((len(blobs), dim), dtype=np.float32)  # filled row by row: no joined copy of a large gallery
    for j, b in enumerate(blobs):
        out[j] = np.frombuffer(b, dtype="<f4")
    return out


class AbstractStore(ABC):
    """Where gallery items live. Every method blocks: call it off the event loop.

    `key` is "name@version". `put` and `delete` are atomic: all items or none; they return the
    committed changes in seq order. They raise `StoreUnavailable` when the database is down.
    """

    #: True when other processes may write the same galleries (then `follow` matters).
    shared: bool = False

    @abstractmethod
    def open(self, key: str, dim: int, seed: Callable[[], Seed | None]) -> Snapshot:
        """The gallery's live items; on the very first open anywhere, import `seed()` first."""

    @abstractmethod
    def put(self, key: str, items: list[Item]) -> list[Change]:
        """Add or replace items (ids unique within the call); one change each, in order."""

    @abstractmethod
    def delete(self, key: str, ids: list[str]) -> list[Change]:
        """Delete live items; raises `UnknownItems` (and deletes nothing) if any id is not live."""

    @abstractmethod
    def changes(self, key: str, after: int, upto: int | None = None) -> list[Change]:
        """Changes with after < seq <= upto (no upper bound when None), in seq order; tombstones included."""

    def follow(self, on_change: Callable[[str, int], None], keys: Callable[[], list[str]]) -> None:
        """Call `on_change(key, last_seq)` when another process commits to a gallery, and for every
        gallery in `keys()` after each (re)connect; a no-op for a store only this process writes."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads."""
