"""Bundles: round trip, and refusal of tampered, truncated or mismatched files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from metalora.adapters import Adapter, AdapterConfig, MetaLoRAModel
from metalora.bundle import BundleError, Gallery, load_bundle, load_gallery, read_manifest, save_bundle
from metalora.store import ModelStore, safe_join

from .conftest import TinyBackbone, randomize


@pytest.fixture
def bundle(tmp_path, tiny_backbone):
    ad = randomize(Adapter(tiny_backbone, AdapterConfig("tr", (2, 3, 2), ["*"], labels=["cat", "dog", "emu"])).double())
    g = Gallery(torch.nn.functional.normalize(torch.randn(6, 12), dim=1), torch.tensor([0, 1, 2, 0, 1, 2]), [f"img{i}" for i in range(6)])
    path = tmp_path / "store" / "adapters" / "pets" / "1"
    save_bundle(path, ad, tiny_backbone, name="pets", version="1", metrics={"knn_top1": 0.5}, gallery=g)
    return path, ad, g


def test_round_trip_same_outputs(bundle, tiny_backbone):
    path, ad, g = bundle
    loaded, manifest = load_bundle(path, tiny_backbone)
    assert manifest["adapter"]["format"] == "tr" and manifest["trainable_params"] == ad.num_trainable()
    assert manifest["backbone"]["name"] == "tiny" and manifest["metrics"]["knn_top1"] == 0.5
    model = MetaLoRAModel(tiny_backbone)
    model.add_adapter("orig", ad)
    model.add_adapter("loaded", loaded.double())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a, b = model(x, ["orig"] * 2), model(x, ["loaded"] * 2)
    # weights are stored in float32: equal to float32 precision
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)
    g2 = load_gallery(path, manifest)
    assert g2.ids == g.ids and torch.equal(g2.labels, g.labels)
    torch.testing.assert_close(g2.embeddings, g.embeddings, atol=2e-3, rtol=0)


def test_store_resolves_latest_and_pinned(bundle, tiny_backbone):
    path, ad, _ = bundle
    save_bundle(path.parent / "2", ad, tiny_backbone, name="pets", version="2")
    save_bundle(path.parent / "10", ad, tiny_backbone, name="pets", version="10")
    store = ModelStore(path.parent.parent.parent)
    assert store.adapter_names() == ["pets"]
    assert store.versions("pets") == ["1", "2", "10"]
    assert store.resolve("pets")[1] == "10"
    assert store.resolve("pets@2")[1] == "2"
    with pytest.raises(BundleError, match="no version"):
        store.resolve("pets@3")
    with pytest.raises(BundleError) as e:
        store.resolve("ghost")
    assert e.value.code == "unknown_adapter"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "UPPER", "", ".hidden", "x" * 65, "a b"])
def test_names_never_leave_the_store(tmp_path, bad):
    with pytest.raises(BundleError) as e:
        safe_join(tmp_path, bad)
    assert e.value.code == "invalid_name"


def _flip_byte(f, offset=-10):
    data = bytearray(f.read_bytes())
    data[offset] ^= 0xFF
    f.write_bytes(bytes(data))


REFUSALS = [
    ("tampered weights", lambda p: _flip_byte(p / "weights.safetensors"), "checksum_mismatch"),
    ("truncated weights", lambda p: (p / "weights.safetensors").write_bytes((p / "weights.safetensors").read_bytes()[:100]), "checksum_mismatch"),
    ("tampered gallery", lambda p: _flip_byte(p / "gallery.safetensors"), "checksum_mismatch"),
    ("missing weights", lambda p: (p / "weights.safetensors").unlink(), "missing_file"),
    ("no manifest", lambda p: (p / "manifest.json").unlink(), "missing_manifest"),
    ("manifest not json", lambda p: (p / "manifest.json").write_text("{nope"), "bad_manifest"),
    ("wrong schema", lambda p: _edit(p, lambda m: m.update(schema="other/9")), "bad_manifest"),
    ("ranks disagree with weights", lambda p: _edit(p, lambda m: m["adapter"].update(ranks=[3, 3, 3])), "shape_mismatch"),
    ("unknown format", lambda p: _edit(p, lambda m: m["adapter"].update(format="svd")), "bad_manifest"),
    ("other backbone", lambda p: _edit(p, lambda m: m["backbone"].update(name="resnet18")), "backbone_mismatch"),
    ("other weights", lambda p: _edit(p, lambda m: m["backbone"].update(weights_sha256="ab" * 32)), "backbone_mismatch"),
    ("file escapes bundle", lambda p: _edit(p, lambda m: m["files"].update({"../x": {"sha256": "", "bytes": 0}})), "bad_manifest"),
]


def _edit(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("what,damage,code", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_damaged_bundle_is_refused(bundle, tiny_backbone, what, damage, code):
    path = bundle[0]
    damage(path)
    with pytest.raises(BundleError) as e:
        load_bundle(path, tiny_backbone)
    assert e.value.code == code, str(e.value)
    assert str(e.value), "the error says what is wrong"


def test_backbone_with_other_weights_is_refused(bundle):
    other = TinyBackbone(tag="f" * 64).double()
    with pytest.raises(BundleError, match="weights sha256"):
        load_bundle(bundle[0], other)


def test_no_pickle_in_bundles(bundle):
    path = bundle[0]
    for f in path.iterdir():
        head = f.read_bytes()[:2]
        assert head != b"\x80\x04" and head != b"\x80\x02", f"{f.name} looks like a pickle"
    assert read_manifest(path)["files"].keys() == {"weights.safetensors", "gallery.safetensors"}


def test_rewrite_is_atomic(bundle, tiny_backbone):
    path, ad, _ = bundle
    save_bundle(path, ad, tiny_backbone, name="pets", version="1", metrics={"knn_top1": 0.9})
    assert read_manifest(path)["metrics"]["knn_top1"] == 0.9
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temp dirs left behind"
    assert "gallery.safetensors" not in read_manifest(path)["files"]


def test_user_weights_are_never_unpickled(tmp_path):
    from metalora.backbones import create_backbone

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "evil.pth"
    f.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(pickle.UnpicklingError):
        create_backbone("resnet18", weights=str(f))


def _clustered(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    y = torch.arange(n) % classes
    return torch.nn.functional.normalize(centres[y] + 0.3 * torch.randn(n, d, generator=g), dim=1), y


def test_product_quantised_gallery_round_trip_and_reference_decode(tmp_path, tiny_backbone):
    """A PQ gallery stores M bytes an item; a reader decodes exactly what training saw, which is
    FAISS's own decode of the same codes (the reference), L2-normalised."""
    import faiss
    from safetensors.torch import save

    from metalora.bundle import pq_decode

    emb, y = _clustered(1200, 64, 6)
    g = Gallery(emb, y, [f"img{i}" for i in range(len(y))])
    c = g.compress(16, seed=0)
    cent, codes = c.pq
    assert codes.shape == (1200, 16) and codes.dtype == torch.uint8 and cent.shape == (16, 256, 4) and cent.dtype == torch.float16
    pq = faiss.ProductQuantizer(64, 16, 8)
    faiss.copy_array_to_vector(cent.float().numpy().ravel(), pq.centroids)
    want = torch.nn.functional.normalize(torch.from_numpy(pq.decode(codes.numpy())), dim=1)
    torch.testing.assert_close(c.embeddings, want, atol=1e-6, rtol=0)
    assert float((c.embeddings * emb).sum(1).min()) > 0.8  # close to the vectors it codes
    # Nearest neighbours: the quantised gallery answers like the exact one for most queries.
    q, _ = _clustered(100, 64, 6, seed=1)
    exact, approx = (q @ emb.T).argmax(1), (q @ c.embeddings.T).argmax(1)
    assert float((y[exact] == y[approx]).float().mean()) >= 0.95
    assert len(save(c.to_tensors())) < len(save(g.to_tensors())) / 2 + 2 * 256 * 64 + 1024
    ad = randomize(Adapter(tiny_backbone, AdapterConfig("tr", (2, 3, 2), ["*"], labels=[str(i) for i in range(6)])))
    path = tmp_path / "store" / "adapters" / "pq" / "1"
    save_bundle(path, ad, tiny_backbone, name="pq", version="1", gallery=c)
    back = load_gallery(path, read_manifest(path))
    assert torch.equal(back.embeddings, c.embeddings) and back.ids == c.ids and torch.equal(back.labels, y)
    assert torch.equal(pq_decode(*back.pq[:1], back.pq[1]), c.embeddings)


def test_product_quantised_gallery_errors():
    from metalora.bundle import BundleError

    emb, y = _clustered(300, 64, 3)
    g = Gallery(emb, y, [f"i{j}" for j in range(300)])
    with pytest.raises(BundleError, match="multiple"):
        g.compress(7)
    with pytest.raises(BundleError, match="256 gallery items"):
        Gallery(emb[:100], y[:100], g.ids[:100]).compress(16)
    t = g.compress(16).to_tensors()
    bad = {**t, "pq_codes": t["pq_codes"].to(torch.int64)}
    with pytest.raises(BundleError, match="pq_codes"):
        Gallery.from_tensors(bad)
    with pytest.raises(BundleError, match="pq_centroids"):
        Gallery.from_tensors({k: v for k, v in t.items() if k != "pq_centroids"})
