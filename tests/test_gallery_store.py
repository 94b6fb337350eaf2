"""Gallery stores: one suite run against the embedded SQLite store and a real PostgreSQL server.

The reference for every search is a brute-force numpy cosine over the items the test itself
wrote (a dict id -> (label, vector)), never the code under test. PostgreSQL is a private cluster
from Debian's `postgresql` package (`service.galleries.pgcluster`), skipped with a reason when
the binaries are absent. A real server on the shipped store with its gallery database down still
answers predictions, without `unknown`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from metalora.adapters import Adapter, AdapterConfig
from metalora.bundle import Gallery, save_bundle
from metalora.store import ModelStore
from service.errors import DomainError, Kind
from service.galleries import EmbeddedStore, Item, LiveIndex, Seed, UnknownItems
from service.galleries import index as index_mod
from service.galleries.manager import Galleries
from service.galleries.pgcluster import PostgresCluster, find_bindir
from service.launch import ServerProcess, free_port

from .conftest import ROOT, TinyBackbone, randomize

pytestmark = pytest.mark.timeout(300)
LABELS = ["cat", "dog", "emu"]
DIM = 12  # TinyBackbone's embedding size
needs_pg = pytest.mark.skipif(find_bindir() is None, reason="PostgreSQL server binaries absent (apt-get install postgresql; .ci/run does it)")


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> ModelStore:
    """A model store with 'pets@1' (a 20-item gallery) and 'bare@1' (no gallery), on the tiny backbone."""
    torch.manual_seed(0)
    bb = TinyBackbone()
    root = tmp_path_factory.mktemp("models")
    for name, n in [("pets", 20), ("bare", 0)]:
        ad = randomize(Adapter(bb, AdapterConfig("lora", (2,), ["*"], labels=LABELS)))
        g = None
        if n:
            g = Gallery(torch.nn.functional.normalize(torch.randn(n, DIM), dim=1), torch.arange(n) % 3, [f"seed{i}" for i in range(n)])
        save_bundle(root / "adapters" / name / "1", ad, bb, name=name, version="1", gallery=g)
    return ModelStore(root)


@pytest.fixture(scope="module")
def pg():
    if find_bindir() is None:
        pytest.skip("PostgreSQL server binaries absent (apt-get install postgresql; .ci/run does it)")
    with PostgresCluster() as cluster:
        yield cluster


_db_counter = iter(range(10**6))


def _factory(kind: str, request, tmp_path, made: list):
    """A factory of store instances over one fresh backing store (a directory, or a new database)."""
    if kind == "embedded":

        def make():
            made.append(EmbeddedStore(tmp_path / "galleries"))
            return made[-1]

    else:
        import psycopg

        from service.galleries.postgres import PostgresStore

        cluster = request.getfixturevalue("pg")
        db = f"t{next(_db_counter)}_{os.getpid()}"
        with psycopg.connect(cluster.dsn, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {db}")
        dsn = cluster.dsn.rsplit("/", 1)[0] + "/" + db

        def make():
            made.append(PostgresStore(dsn, timeout_s=2.0, resync_s=2.0))
            return made[-1]

        make.dsn = dsn
    make.kind = kind
    return make


@pytest.fixture(params=["embedded", pytest.param("postgres", marks=needs_pg)])
def make_store(request, tmp_path):
    made: list = []
    yield _factory(request.param, request, tmp_path, made)
    for s in made:
        s.close()


@pytest.fixture
def make_pg_store(request, tmp_path):
    made: list = []
    yield _factory("postgres", request, tmp_path, made)
    for s in made:
        s.close()


def _seed(n=5, rng=None) -> Seed:
    rng = rng or np.random.default_rng(0)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return Seed([f"s{i}" for i in range(n)], [LABELS[i % 3] for i in range(n)], v / np.linalg.norm(v, axis=1, keepdims=True))


def _vec(rng) -> np.ndarray:
    return rng.standard_normal(DIM).astype(np.float32)


def _no_seed():
    raise AssertionError("the seed must be imported only once")


def _reference(state: dict[str, tuple[str, np.ndarray]], q: np.ndarray, k: int) -> list[str]:
    """Brute-force cosine top-k ids over the test's own record of the gallery."""
    ids = list(state)
    m = np.stack([state[i][1] / np.linalg.norm(state[i][1]) for i in ids])
    s = m @ (q / np.linalg.norm(q))
    return [ids[j] for j in np.argsort(-s, kind="stable")[:k]]


# ------------------------------------------------------------------------ the store interface
def test_seed_imported_once_then_changes_numbered_in_order(make_store):
    s = make_store()
    seed = _seed(5)
    snap = s.open("pets@1", DIM, lambda: seed)
    assert snap.seeded and snap.cursor == 5 and snap.source == "bundle" and snap.ids == seed.ids
    np.testing.assert_allclose(snap.vectors, seed.vectors, rtol=0, atol=0)
    rng = np.random.default_rng(1)
    ch = s.put("pets@1", [Item("a", "cat", _vec(rng)), Item("s0", "emu", _vec(rng))])
    assert [c.seq for c in ch] == [6, 7]
    assert [c.seq for c in s.delete("pets@1", ["s1"])] == [8]
    with pytest.raises(UnknownItems) as e:
        s.delete("pets@1", ["s2", "ghost", "s1"])  # one missing, one already deleted: nothing happens
    assert e.value.ids == ["ghost", "s1"]
    got = s.changes("pets@1", 5)
    assert [(c.seq, c.id, c.label, c.deleted) for c in got] == [(6, "a", "cat", False), (7, "s0", "emu", False), (8, "s1", None, True)]
    np.testing.assert_array_equal(got[0].vector, ch[0].vector)
    assert [c.id for c in s.changes("pets@1", 5, 6)] == ["a"]
    s2 = make_store()  # another process (or a restart) sees the same state and never re-imports the seed
    snap2 = s2.open("pets@1", DIM, _no_seed)
    assert not snap2.seeded and snap2.cursor == 8 and snap2.source == "edited"
    assert sorted(snap2.ids) == sorted(["s0", "s2", "s3", "s4", "a"])
    assert snap2.labels[snap2.ids.index("s0")] == "emu"


def test_gallery_without_seed_and_separate_versions(make_store):
    s = make_store()
    assert s.open("bare@1", DIM, lambda: None).source == "none"
    s.open("pets@2", DIM, lambda: _seed(3))
    s.put("bare@1", [Item("x", "dog", np.ones(DIM, np.float32))])
    snap = s.open("pets@2", DIM, _no_seed)
    assert snap.ids == ["s0", "s1", "s2"] and snap.cursor == 3
    assert s.open("bare@1", DIM, _no_seed).ids == ["x"]


def test_replicas_opening_together_import_the_seed_once(make_store):
    stores = [make_store() for _ in range(3)]
    out, errors = [], []

    def open_one(s):
        try:
            out.append(s.open("pets@1", DIM, lambda: _seed(50)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in stores]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and sum(s.seeded for s in out) == 1
    assert all(len(s.ids) == 50 and s.cursor == 50 for s in out)


# ------------------------------------------------------------------------ the live index
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_live_index_edits_match_brute_force(kind, monkeypatch):
    monkeypatch.setattr(index_mod, "COMPACT_MIN_DEAD", 50)
    monkeypatch.setattr(index_mod, "MERGE_MIN", 16)  # delta -> HNSW merges along the way too
    rng = np.random.default_rng(2)
    index = LiveIndex("toy@1", LABELS, DIM, exact_max=10 if kind == "hnsw" else 10_000, background=False)
    state: dict[str, tuple[str, np.ndarray]] = {}
    ids = [f"i{j}" for j in range(400)]
    vecs = rng.standard_normal((400, DIM)).astype(np.float32)
    index.load(ids, [j % 3 for j in range(400)], vecs)
    state.update({i: (LABELS[j % 3], vecs[j]) for j, i in enumerate(ids)})
    assert index.kind == kind
    for step in range(600):  # replaces, deletes and adds, with compactions along the way
        r = rng.random()
        if r < 0.4 and state:
            victim = list(state)[rng.integers(len(state))]
            index.apply(deletes=[victim])
            del state[victim]
        else:
            item = f"i{rng.integers(600)}"
            v, lab = _vec(rng), int(rng.integers(3))
            created = index.apply([(item, lab, v)])
            assert created == [item not in state]
            state[item] = (LABELS[lab], v)
    assert index.compactions >= 1 and len(index) == len(state)
    if kind == "hnsw":
        assert index.m > 0 and index.pending_merge < 16 + 1  # the merge ran
    assert index.label_counts() == {lab: n for lab in LABELS if (n := sum(1 for l, _ in state.values() if l == lab))}
    hits_per_query, recall = [], []
    for _ in range(30):
        q = _vec(rng)
        hits = index.search(q, 10)[0]
        assert {h.id for h in hits} <= set(state) and len(hits) == 10
        assert all(h.label == state[h.id][0] for h in hits)
        want = _reference(state, q, 10)
        recall.append(len({h.id for h in hits} & set(want)) / 10)
        hits_per_query.append(hits)
        if kind == "flat":
            assert [h.id for h in hits] == want
            np.testing.assert_allclose([h.score for h in hits], [float(state[i][1] @ q / np.linalg.norm(state[i][1]) / np.linalg.norm(q)) for i in want], atol=1e-5)
    assert np.mean(recall) >= 0.95


def test_compaction_in_the_background_never_blocks_or_breaks_searches(monkeypatch):
    """Searches and writes run while compactions rebuild the index; every answer holds only live ids."""
    monkeypatch.setattr(index_mod, "COMPACT_MIN_DEAD", 200)
    monkeypatch.setattr(index_mod, "_CHUNK", 256)
    monkeypatch.setattr(index_mod, "MERGE_MIN", 64)
    rng = np.random.default_rng(3)
    n = 3000
    index = LiveIndex("toy@1", LABELS, DIM, exact_max=1000)  # hnsw, background compaction
    index.load([f"i{j}" for j in range(n)], np.zeros(n, np.int32), rng.standard_normal((n, DIM)).astype(np.float32))
    deleted: set[str] = set()
    stop, bad, searches = threading.Event(), [], [0]

    def searcher():
        r = np.random.default_rng(4)
        while not stop.is_set():
            gone = set(deleted)  # deleted before this search started
            for h in index.search(r.standard_normal((2, DIM)), 10)[0]:
                if h.id in gone:
                    bad.append(h.id)
            searches[0] += 1

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    [t.start() for t in threads]
    try:
        for j in range(2000):
            victim = f"i{j}"
            index.apply(deletes=[victim])
            deleted.add(victim)
            if j % 3 == 0:
                index.apply([(f"new{j}", 1, _vec(rng))])
        index.wait_compaction(60)
    finally:
        stop.set()
        [t.join() for t in threads]
    assert index.compactions >= 1 and not bad and searches[0] > 0
    assert len(index) == n - 2000 + 667
    ids, labels, vecs = index.items()
    assert not (set(ids) & deleted) and len(ids) == len(index) and vecs.shape == (len(index), DIM)


# ------------------------------------------------------------------------ the service's galleries on each store
def test_galleries_put_search_delete_and_restart(make_store, models, tmp_path):
    g = Galleries(models, make_store(), DIM, exact_max=100)
    index = g.get("pets@1")
    assert len(index) == 20 and index.source == "bundle"
    rng = np.random.default_rng(5)
    v = _vec(rng)
    _, created = g.put("pets@1", [Item("new", "dog", v), Item("seed3", "emu", -v)])
    assert created == [True, False] and len(index) == 21
    hits = index.search(v, 3)[0]
    assert hits[0].id == "new" and abs(hits[0].score - 1) < 1e-5 and hits[-1].id != "seed3"
    g.delete("pets@1", ["new"])
    with pytest.raises(DomainError) as e:
        g.delete("pets@1", ["new"])
    assert (e.value.kind, e.value.code) == (Kind.NOT_FOUND, "unknown_item")
    for bad, code in [(Item("z", "zebra", v), "unknown_label"), (Item("z", "cat", v[:3]), "invalid_vector"), (Item("z", "cat", v * np.nan), "invalid_vector"), (Item("z", "cat", v * 0), "invalid_vector")]:
        with pytest.raises(DomainError) as e:
            g.put("pets@1", [Item("ok", "cat", v), bad])  # all or nothing
        assert e.value.code == code and "ok" not in index
    with pytest.raises(DomainError) as e:
        g.put("pets@1", [Item("d", "cat", v), Item("d", "dog", v)])
    assert e.value.code == "duplicate_id"
    g.close()
    g2 = Galleries(models, make_store(), DIM, exact_max=100)  # a restart
    again = g2.get("pets@1")
    assert len(again) == 20 and "new" not in again and again.source == "edited"
    assert again.get("seed3")[0] == "emu"
    np.testing.assert_allclose(again.get("seed3")[1], -v / np.linalg.norm(v), atol=1e-6)
    g2.close()


def test_deleted_item_stays_deleted_after_compaction_and_restart(make_store, models, monkeypatch):
    monkeypatch.setattr(index_mod, "COMPACT_MIN_DEAD", 5)
    g = Galleries(models, make_store(), DIM, exact_max=100)
    index = g.get("pets@1")
    rng = np.random.default_rng(6)
    gone = [f"seed{i}" for i in range(10)]
    g.delete("pets@1", gone)
    g.put("pets@1", [Item(f"n{i}", "cat", _vec(rng)) for i in range(3)])
    index.wait_compaction(30)
    assert index.compactions >= 1
    for restart in range(2):
        found = {h.id for h in index.search(rng.standard_normal((5, DIM)), 13)[0]}
        assert not found & set(gone) and len(found) == 13
        g.close()
        g = Galleries(models, make_store(), DIM, exact_max=100)
        index = g.get("pets@1")
    g.close()


def test_embedded_acknowledged_writes_survive_kill_9(models, tmp_path):
    """A child process writes items and prints each id once `put` returned; kill -9 it mid-stream."""
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from service.galleries import EmbeddedStore, Item, Seed
        s = EmbeddedStore(sys.argv[1])
        s.open("pets@1", {DIM}, lambda: None)
        rng = np.random.default_rng(0)
        for i in range(100000):
            s.put("pets@1", [Item(f"w{{i}}", "cat", rng.standard_normal({DIM}).astype(np.float32))])
            print(f"w{{i}}", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "g")], stdout=subprocess.PIPE, text=True)
    acked = []
    while len(acked) < 30:
        acked.append(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acked += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]  # printed before the kill landed
    snap = EmbeddedStore(tmp_path / "g").open("pets@1", DIM, _no_seed)
    assert set(acked) <= set(snap.ids) and snap.cursor == len(snap.ids) >= len(acked)


# ------------------------------------------------------------------------ replicas on one PostgreSQL
@needs_pg
def test_two_replicas_follow_each_other_and_converge(make_pg_store, models):
    make_store = make_pg_store
    a = Galleries(models, make_store(), DIM, exact_max=100)
    b = Galleries(models, make_store(), DIM, exact_max=100)
    ia, ib = a.get("pets@1"), b.get("pets@1")
    rng = np.random.default_rng(7)
    v = _vec(rng)
    a.put("pets@1", [Item("from-a", "emu", v)])
    t0 = time.monotonic()
    while "from-a" not in ib and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    seen_s = time.monotonic() - t0
    assert "from-a" in ib and seen_s < 1.0, f"replica B saw A's write after {seen_s:.3f} s"
    assert ib.search(v, 1)[0][0].id == "from-a"
    b.delete("pets@1", ["from-a"])
    t0 = time.monotonic()
    while "from-a" in ia and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert "from-a" not in ia

    def hammer(g, tag):
        r = np.random.default_rng(hash(tag) % 2**32)
        for i in range(40):
            g.put("pets@1", [Item("contested", LABELS[i % 3], r.standard_normal(DIM).astype(np.float32)), Item(f"{tag}-{i}", "cat", r.standard_normal(DIM).astype(np.float32))])

    threads = [threading.Thread(target=hammer, args=(g, tag)) for g, tag in [(a, "a"), (b, "b"), (a, "a2"), (b, "b2")]]
    [t.start() for t in threads]
    [t.join() for t in threads]
    truth = make_store().open("pets@1", DIM, _no_seed)
    t0 = time.monotonic()
    while min(ia.cursor, ib.cursor) < truth.cursor and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    for index in (ia, ib):
        ids, labels, vecs = index.items()
        assert sorted(ids) == sorted(truth.ids) and index.cursor == truth.cursor
        row = truth.ids.index("contested")
        lab, vec = index.get("contested")
        assert lab == truth.labels[row]
        np.testing.assert_allclose(vec, truth.vectors[row] / np.linalg.norm(truth.vectors[row]), atol=1e-6)
    a.close()
    b.close()


@needs_pg
@pytest.mark.slow
def test_database_down_answers_503_and_recovers(make_pg_store, models, pg):
    make_store = make_pg_store
    a = Galleries(models, make_store(), DIM, exact_max=100)
    b = Galleries(models, make_store(), DIM, exact_max=100)
    ia, ib = a.get("pets@1"), b.get("pets@1")
    rng = np.random.default_rng(8)
    pg.stop("fast")
    try:
        with pytest.raises(DomainError) as e:
            a.put("pets@1", [Item("while-down", "cat", _vec(rng))])
        assert e.value.kind is Kind.UNAVAILABLE and e.value.code == "gallery_unavailable" and e.value.retry_after_s >= 1
        assert len(ia.search(_vec(rng), 3)[0]) == 3  # searches go on from memory
    finally:
        pg.start()
    t0 = time.monotonic()
    while True:  # the pool reconnects by itself
        try:
            a.put("pets@1", [Item("after", "dog", _vec(rng))])
            break
        except DomainError:
            assert time.monotonic() - t0 < 20
            time.sleep(0.2)
    t0 = time.monotonic()
    while "after" not in ib and time.monotonic() - t0 < 15:  # B's listener reconnected and caught up
        time.sleep(0.05)
    assert "after" in ib and "while-down" not in ib
    a.close()
    b.close()


@needs_pg
def test_listener_outlives_a_failing_callback_and_retries_it_without_a_later_write(make_pg_store):
    from service.galleries.postgres import PostgresStore

    writer = make_pg_store()
    follower = PostgresStore(make_pg_store.dsn, resync_s=3600)  # the periodic resync must not be what repairs it
    writer.open("pets@1", DIM, lambda: None)
    calls = []

    def on_change(key, seq):
        calls.append((key, seq, time.monotonic()))
        if len(calls) == 1:
            raise RuntimeError("one gallery's trouble")

    try:
        follower.follow(on_change, lambda: [])
        assert follower.listening.wait(10)
        writer.put("pets@1", [Item("x0", "cat", np.ones(DIM, np.float32))])
        t0 = time.monotonic()
        while len(calls) < 2 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert [c[:2] for c in calls] == [("pets@1", 1), ("pets@1", 1)], calls  # the failed one, then its retry
        assert calls[1][2] - calls[0][2] < 1.0  # retried promptly, with no other write to trigger it
        writer.put("pets@1", [Item("x1", "cat", np.ones(DIM, np.float32))])
        t0 = time.monotonic()
        while len(calls) < 3 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert [c[:2] for c in calls] == [("pets@1", 1), ("pets@1", 1), ("pets@1", 2)]  # the listener lives on
    finally:
        follower.close()


# ------------------------------------------------------------------------ a real server, its gallery database down
@pytest.mark.slow
def test_predict_answers_without_unknown_while_the_gallery_database_is_down(tmp_path, cat):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with ServerProcess(ROOT / "model_store", tmp_path / "s.log", gallery_dsn=dead, gallery_dir=tmp_path / "g", adapters="cifar10", grpc_port=0) as srv:
        r = httpx.post(srv.url + "/v1/predict", files=[("images", ("c.jpg", cat))], data={"adapter": "cifar10", "top_k": "1"}, timeout=30)
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["predictions"][0]["label"] == "cat" and "unknown" not in res
        assert httpx.post(srv.url + "/v1/knn", files=[("images", ("c.jpg", cat))], data={"adapter": "cifar10"}, timeout=30).json()["error"]["code"] == "gallery_unavailable"
