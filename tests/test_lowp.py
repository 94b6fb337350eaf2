"""Low-precision prefix (metalora/backends/lowp.py and its calibration), the precision setting, section (g) helpers and bench/gpu.sh.

References: hand-written /proc/cpuinfo files, timm's own dynamic-padding prefix (exact), FP32
results of the same images (accuracy drops), and arithmetic done here by hand (peak FLOP/s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import DATA, ROOT, needs_shared

ort = pytest.importorskip("onnxruntime")
from metalora.backends import accuracy, calib, cpu, export, lowp  # noqa: E402
from metalora.backends.base import BASE  # noqa: E402
from metalora.backends.calib import CalibrationSet  # noqa: E402

# What the library used to find by itself, now passed as the benchmarks pass it: ../shared/data when present.
SHARED = CalibrationSet(data=DATA if DATA.is_dir() else None)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
cpu MHz\t\t: 2000.000
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni {extra}

processor\t: 1
"""


def _cpuinfo(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(CPUINFO.format(extra=extra))
    return p


def test_cpu_flags_and_info_are_read_from_the_file(tmp_path):
    p = _cpuinfo(tmp_path, "amx_tile amx_int8")
    assert {"avx512f", "avx512_vnni", "amx_int8"} <= cpu.cpu_flags(p)
    info = cpu.cpu_info(p)
    assert info["model"] == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    assert info["isa"] == ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]
    assert cpu.cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize(
    "precision, extra, ok",
    [
        ("bf16", "", False),  # no avx512_bf16 / amx_bf16: never assumed
        ("bf16", "avx512_bf16", True),
        ("bf16", "amx_bf16", True),
        ("int8", "", True),
        ("fp32", "", True),
        ("fp8", "", False),
    ],
)
def test_precision_availability_follows_the_cpu_flags(tmp_path, precision, extra, ok):
    flags = cpu.cpu_flags(_cpuinfo(tmp_path, extra))
    why = lowp.unavailable(precision, flags)
    assert (why is None) == ok, why
    assert ("bf16" in lowp.candidates(flags)) == bool(extra)


def test_peak_fp32_derivation(tmp_path):
    from bench.lowp import peak_fp32

    p = _cpuinfo(tmp_path)
    got = peak_fp32(2, cpu.cpu_flags(p), str(p))
    assert got["peak_fp32_flop_s"] == pytest.approx(2 * 2.0e9 * 16 * 2 * 2)  # cores x Hz x AVX-512 lanes x FMA x 2 units
    assert "2.00 GHz" in got["derivation"] and "16 FP32 lanes" in got["derivation"]
    avx2 = frozenset({"avx2", "fma"})
    assert peak_fp32(1, avx2, str(p))["peak_fp32_flop_s"] == pytest.approx(2.0e9 * 8 * 2 * 2)
    # AMD Zen 4 (family 25) reports avx512f but runs it on two 256-bit FMA pipes: half the lanes.
    zen4 = tmp_path / "zen4"
    zen4.write_text(p.read_text().replace("GenuineIntel", "AuthenticAMD\ncpu family\t: 25", 1))
    got = peak_fp32(2, cpu.cpu_flags(zen4), str(zen4))
    assert got["peak_fp32_flop_s"] == pytest.approx(2 * 2.0e9 * 8 * 2 * 2) and "Zen" in got["derivation"]


def test_precision_setting(monkeypatch):
    from service.settings import Settings

    assert Settings().precision == "fp32"  # the adapters' own numbers by default; int8 is opt-in
    monkeypatch.setenv("METALORA_PRECISION", "int8")
    assert Settings().precision == "int8"
    monkeypatch.setenv("METALORA_PRECISION", "fp8")
    with pytest.raises(Exception, match="precision"):
        Settings()


def test_settings_name_the_graph_cache_and_the_calibration_images(monkeypatch, tmp_path):
    """The server's ONNX cache and INT8 calibration images come from its settings, nowhere else."""
    from service.settings import Settings

    for v in ("METALORA_ONNX_CACHE", "METALORA_CALIBRATION_DATA", "METALORA_SHARED"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    s = Settings()
    assert s.onnx_cache == tmp_path / "xdg" / "metalora" / "onnx"
    assert s.calibration == CalibrationSet()  # no data directory unless one is named: the digits/photos fallback
    (tmp_path / "sh" / "data").mkdir(parents=True)
    monkeypatch.setenv("METALORA_ONNX_CACHE", str(tmp_path / "o"))
    monkeypatch.setenv("METALORA_CALIBRATION_DATA", "a;b")
    monkeypatch.setenv("METALORA_SHARED", str(tmp_path / "sh"))
    s = Settings()
    assert s.onnx_cache == tmp_path / "o" and s.calibration == CalibrationSet(images="a;b", data=tmp_path / "sh" / "data")
    monkeypatch.setenv("METALORA_ONNX_CACHE", "")  # empty = unset, as before
    assert Settings().onnx_cache == tmp_path / "xdg" / "metalora" / "onnx"


def test_torch_backend_refuses_a_low_precision():
    from service.engine import make_backend
    from service.settings import Settings

    class RT:
        device = torch.device("cpu")

    with pytest.raises(ValueError, match="onnx backend"):
        make_backend("torch", RT(), Settings(precision="int8"))
    assert make_backend("torch", RT(), Settings(precision="fp32"))[0] == "torch"


def test_calibration_never_uses_test_images(monkeypatch, tmp_path):
    monkeypatch.setenv("METALORA_SHARED", str(DATA.parent))  # the library reads no environment: still the fallback
    src = calib.calibration_sources(64)  # no images, no data directory named: the documented fallback
    assert 56 <= len(src) <= 64  # per-class subsets round down
    assert all(k in ("skimage", "spec") for k, _ in src)
    assert all("split=train" in i for k, i in src if k == "spec")
    # A deployment names its own images: only those, a seeded sample when there are more.
    own_set = CalibrationSet(images="sklearn:digits?split=train,per_class=20", data=SHARED.data)
    own = calib.calibration_sources(64, own_set)
    assert len(own) == 64 and own == calib.calibration_sources(64, own_set)
    assert all(i.startswith("sklearn:digits?split=train,per_class=20#") for _, i in own)


@needs_shared("imagenet-sample", "val.zip")
@needs_shared("gtsrb", "train.zip")
def test_calibration_covers_every_served_domain_from_training_splits():
    src = calib.calibration_sources(256, SHARED)
    used, held = calib.imagenet_split(SHARED.data)
    assert len(src) == 256 and {i for k, i in src if k == "imagenet"} <= set(used)  # never a held-out photo
    specs = [i.rpartition("#")[0] for k, i in src if k == "spec"]
    assert all("/train.zip?" in sp or "split=train" in sp for sp in specs)  # never a test image
    for name, _ in calib.CALIBRATION_DOMAINS:  # the domains the shipped adapters serve, each well represented
        assert sum(f"/{name}/train.zip" in sp for sp in specs) >= 16, name
    assert sum(sp.startswith("sklearn:digits") for sp in specs) >= 16


def test_accuracy_runs_on_the_whole_test_splits():
    """A bundle may record a subset of a test split; the INT8 bound is checked on all of it."""
    m = {"metrics": {"data": ["cifar10=../shared/data/cifar10/test.zip?per_class=50", "digits=sklearn:digits?split=test,per_class=30"]}}
    assert accuracy._test_specs(m, Path("/d"), None) == ["cifar10=/d/cifar10/test.zip", "digits=sklearn:digits?split=test"]
    assert accuracy._test_specs(m, Path("/d"), 5) == ["cifar10=/d/cifar10/test.zip?per_class=5", "digits=sklearn:digits?split=test,per_class=5"]


@pytest.fixture(scope="module")
def runtime():
    from metalora.runtime import Runtime

    return Runtime(device="cpu")


@pytest.mark.slow
def test_static_pad_prefix_is_exact_and_has_no_shape_ops(runtime, tmp_path):
    import onnx

    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (2, 3, S, S)
    bb = export.static_pad_copy(runtime.backbone, 224)
    with torch.no_grad():
        ref = runtime.backbone.float().prefix(x)
        assert torch.equal(bb.prefix(x), ref)  # timm's dynamic SAME padding is the reference
    path = export.export_static_prefix(runtime.backbone, tmp_path / "p.onnx", 224)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Shape", "Ceil", "Gather"}, ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-4


@pytest.fixture(scope="module")
def int8_runners(runtime, tmp_path_factory):
    cache = tmp_path_factory.mktemp("onnx")
    return {p: lowp.LowpRunner(runtime, p, cache_dir=cache, threads=torch.get_num_threads(), calibration=SHARED) for p in ("fp32", "int8")}


@pytest.mark.slow
def test_int8_runner_matches_fp32_and_keeps_mixed_batches(runtime, int8_runners):
    x = calib.check_images(runtime.preprocessor, calibration=SHARED)
    checks = lowp.check_precision(runtime, int8_runners, x)
    assert checks["fp32"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert checks["int8"]["pass"], checks
    # The int8 graph really is quantised: QDQ pairs that ORT turns into QLinearConv.
    import onnx

    path = int8_runners["int8"].prefix_graph()
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node) > 10
    # A mixed batch through the low-precision runner answers per sample like a one-key batch.
    xb = torch.from_numpy(x[:4])
    mixed = int8_runners["int8"].run(xb, ["base", "base", "base", "base"])
    one = int8_runners["int8"].run(xb[2:3], ["base"])
    assert torch.allclose(mixed.logits[2], one.logits[0], atol=1e-3)
    assert set(mixed.stages) == {"prefix", "adapters"}


@pytest.mark.slow
def test_auto_choice_is_cached_and_passes_its_check(runtime, int8_runners):
    cache = int8_runners["int8"].cache_dir  # graphs already quantised there; no decision cached yet
    chosen, rep = lowp.choose_precision(runtime, "auto", cache_dir=cache, calibration=SHARED)
    assert chosen in lowp.candidates() and rep["how"] == "measured"
    assert rep["checks"][chosen]["pass"]
    again, rep2 = lowp.choose_precision(runtime, "auto", cache_dir=cache, calibration=SHARED)
    assert again == chosen and rep2["how"] == "cached"
    with pytest.raises(ValueError):
        lowp.choose_precision(runtime, "fp8")


@pytest.mark.slow
@needs_shared("imagenet-sample", "val.zip")
@needs_shared("cifar10", "test.zip")
@needs_shared("mnist", "test.zip")
def test_int8_accuracy_drop_on_a_small_set(runtime, int8_runners, tmp_path):
    """ImageNet-sample top-1 and every shipped adapter's k-NN@10 / head top-1, INT8 vs FP32.

    A set of n images moves in steps of 100/n points, so each bound has one image of slack.
    ImageNet is held to the issue's 0.5 points. The adapters are held to 2 points: with 10 images
    a class one image is 0.2-1 point, so the 0.5-point bound is the full run's to check (every
    test image: worst drop 0.46 points, docs/benchmarks.md section h); this bound catches a
    regression such as quantising the stem again (-4.7 on digits).
    """
    st = accuracy.evaluate_precisions(runtime, ["fp32", "int8"], imagenet=200, per_class=10, state_path=tmp_path / "s.json", data=DATA,
                                      cache_dir=int8_runners["int8"].cache_dir, log=lambda m: None)
    table = accuracy.accuracy_table(st)
    assert set(table) == {"imagenet", *(runtime.load(n) for n in runtime.store.adapter_names())}  # every shipped adapter, newest version
    for name, rows in table.items():
        n = rows["int8"]["n"]
        bound = (0.5 if name == "imagenet" else 2.0) + 100 / n
        for d, v in rows["int8"].items():
            if d.endswith("_drop_points"):
                assert v <= bound, (name, d, v, n)
    assert json.loads((tmp_path / "s.json").read_text()) == st  # resumable state on disk


def test_gpu_markdown_block_replaces_an_earlier_one(tmp_path):
    from bench.gpu import BEGIN, END, kept_block, write_block

    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nCPU text\n")
    write_block(doc, f"{BEGIN}\nfirst\n{END}\n")
    write_block(doc, f"{BEGIN}\nsecond\n{END}\n")
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and "second" in text and "first" not in text and "CPU text" in text
    assert kept_block(doc).startswith(BEGIN) and "second" in kept_block(doc)


@pytest.mark.slow
def test_gpu_script_steps_run_on_cpu_at_tiny_sizes(tmp_path):
    """bench/gpu.sh end to end in its CPU dry run: every step runs and the block is marked as CPU."""
    env = {**os.environ, "METALORA_GPU_DRYRUN": "1", "METALORA_BIN": str(Path(sys.executable).parent), "METALORA_GPU_JSON": str(tmp_path / "gpu.json"), "METALORA_GPU_DOC": str(tmp_path / "b.md")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["kind"] == "cpu-dry-run" and not res["errors"]
    assert set(res["precision"]["images_per_s"]) == {"4", "8"}
    assert res["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert all(r["ok"] > 0 and not r["errors"] for r in res["http"]["sweep"].values())
    assert "CPU dry run" in (tmp_path / "b.md").read_text()


@pytest.mark.slow
def test_auto_leaves_int8_out_without_photos_to_calibrate_on(runtime, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "skimage", None)  # scikit-image absent: digits are all that is left
    assert {k for k, _ in calib.calibration_sources(64)} == {"spec"}  # no images or data directory named
    chosen, rep = lowp.choose_precision(runtime, "auto", cache_dir=tmp_path)
    assert chosen != "int8" and "int8" in rep["skipped"] and "int8" not in rep["checks"]


@pytest.mark.parametrize(
    "args, env, says",
    [
        (["--backend", "torch", "--precision", "int8"], {}, "torch backend is fp32"),
        (["--precision", "int8"], {"METALORA_CALIBRATION_DATA": "/nonexistent/calibration"}, "METALORA_CALIBRATION_DATA"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--precision", "fp8"], {}, "cuda" if not torch.cuda.is_available() else "precision"),
    ],
)
@pytest.mark.slow
def test_serve_refuses_what_it_cannot_run_before_starting(args, env, says):
    """A precision the backend cannot run or calibration images that are not there: a one-line
    usage error and exit 2, not a server that starts and then fails every request."""
    from tests.conftest import run_metalora

    r = run_metalora("serve", "--port", "1", "--grpc-port", "0", *args, env=env, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert says in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_cache_that_cannot_be_written_builds_graphs_in_a_scratch_dir(runtime, tmp_path):
    """A read-only ONNX cache (a volume mounted read-only) must not fail requests: graphs it
    holds are read from it, graphs it lacks go to a per-process scratch directory."""
    from metalora.backends.onnx import OrtRunner

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # nothing can be created under a file, root or not
    r = OrtRunner(runtime, cache_dir=blocked / "onnx", threads=1)
    assert r.prefix_path().parent != blocked / "onnx" and r.prefix_path().parent.is_dir()
    x = torch.from_numpy(calib.check_images(runtime.preprocessor, n=2))  # (2, 3, S, S)
    got, ref = r.run(x, [BASE] * 2), runtime.run(x, [BASE] * 2)
    assert torch.allclose(torch.stack(got.logits), torch.stack(ref.logits), atol=1e-3)


@pytest.mark.slow
def test_a_cut_short_auto_decision_is_measured_again(runtime, tmp_path, monkeypatch):
    """The cached `auto` decision is written atomically; a broken one (a crash mid-write on an
    older version, a disk filling up) is ignored rather than failing the start."""
    monkeypatch.setattr(lowp, "candidates", lambda flags=None: ["fp32"])  # keep it quick: no quantisation
    chosen, rep = lowp.choose_precision(runtime, "auto", cache_dir=tmp_path)
    (f,) = tmp_path.glob("precision-auto-*.json")
    assert (chosen, rep["how"]) == ("fp32", "measured") and json.loads(f.read_text())["chosen"] == "fp32"
    f.write_text('{"chos')
    assert lowp.choose_precision(runtime, "auto", cache_dir=tmp_path)[1]["how"] == "measured"
    assert lowp.choose_precision(runtime, "auto", cache_dir=tmp_path)[1]["how"] == "cached"


def test_deployer_images_split_into_calibration_and_held_out_check_photos(tmp_path, runtime):
    """The deployer's images (METALORA_CALIBRATION_DATA): 16 of them are kept out of calibration for the start-up
    check (so `auto` may take int8 on them), a file that is not an image is skipped with a warning
    naming it, and replacing an image under the same name changes the calibration digest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "calib" / "photos"
    root.mkdir(parents=True)
    for i in range(80):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    (root / "zz-broken.png").write_bytes(b"not an image")
    cs = CalibrationSet(images=str(tmp_path / "calib"), data=SHARED.data)
    own = calib.own_images(cs.images)
    used = calib.calibration_sources(256, cs)
    held = own[: calib.own_check_count(len(own))]
    assert len(held) == 16 and len(used) == len(own) - 16 and not set(held) & set(used)
    assert calib.photos_held_out(cs)
    with pytest.warns(UserWarning, match="zz-broken"):
        x, digest = calib.calibration_images(runtime.preprocessor, 256, cs)
    assert x.shape[0] == len(used) - (0 if all("zz-broken" not in i for _, i in used) else 1)
    chk = calib.check_images(runtime.preprocessor, calibration=cs) if all("zz-broken" not in i for _, i in held) else None
    if chk is not None:
        assert chk.shape[0] == calib.CHECK_IMAGES
    victim = next(i for _, i in used if "zz-broken" not in i).rpartition("#")[2]
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root.parent / victim)
    assert calib.calibration_digest(calib.calibration_sources(256, cs)) != digest
