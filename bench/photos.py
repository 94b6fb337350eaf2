"""Section (i): phone-sized photos next to small images through HTTP, concurrency 32, default backend.

One real `metalora serve` (backend `auto`: ONNX Runtime on CPU, the service's default) serving
the frozen backbone (`base`). Rounds alternate two closed-loop windows at concurrency 32: 12 MP
quality-90 JPEGs (about 3 MB, made in memory by `bench.decode.phone_photo`) and small (256 px)
JPEGs. `photo_vs_small_c32` = photo images/s / small images/s, median over rounds. The decode
share is CPU time: the server's own decode step (`service.decode.decode_one`: base64, decode,
preprocess) timed with `time.thread_time` here, over the server process's CPU seconds per image
in the window (/proc, every thread). CPU time, not wall time: it is not inflated by waiting.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from clients.loadgen import LoadSpec, run_load_sync

from .common import sample_images
from .decode import CFG, phone_photo
from .server import ServerProcess, build_store


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _decode_cpu_s(imgs: list[bytes], repeats: int = 2) -> float:
    """CPU seconds per image of the server's own decode step (`service.decode.decode_one`: base64 + decode + preprocess)."""
    import base64

    from metalora.images import Preprocessor
    from service.decode import decode_one
    from service.settings import Settings

    s = Settings()
    pre = Preprocessor(CFG)
    b64 = [base64.b64encode(b).decode() for b in imgs]
    t = time.thread_time()
    for _ in range(repeats):
        for i, b in enumerate(b64):
            decode_one(pre, b, f"images[{i}]", s.max_pixels, s.max_aspect_ratio)
    return (time.thread_time() - t) / (repeats * len(b64))


def photos_vs_small(window_s: float = 8.0, rounds: int = 3, concurrency: int = 32, photo_size: tuple[int, int] = (4032, 3024), n_photos: int = 4, workdir: Path | None = None) -> dict:
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="metalora-bench-photos-")
    work = Path(workdir or tmp.name)
    store = build_store(work / "store", {})
    (store / "adapters").mkdir(exist_ok=True)
    photos = [phone_photo(photo_size, seed=i) for i in range(n_photos)]
    small = sample_images(16, size=256)
    server = ServerProcess(store, work / "photos.log", device="cpu", max_queue=4096, max_delay_ms=10, max_body_bytes=64 * 2**20, log_level="warning")
    out: dict = {
        "what": f"closed-loop HTTP load at concurrency {concurrency}, 1 image per request, adapter base, default backend; photos = {photo_size[0]}x{photo_size[1]} quality-90 JPEG, small = 256 px JPEG",
        "photo_bytes_mean": statistics.fmean(len(p) for p in photos),
        "small_bytes_mean": statistics.fmean(len(s) for s in small),
        "window_s": window_s,
        "rounds": rounds,
        "concurrency": concurrency,
    }
    try:
        server.start()

        def window(imgs, decode_cpu):
            cpu0 = _cpu_s(server.proc.pid)
            rep = run_load_sync(LoadSpec(url=server.url, images=imgs, adapters={"base": 1.0}, concurrency=concurrency, duration_s=window_s, warmup_requests=2, timeout_s=120))
            cpu = (_cpu_s(server.proc.pid) - cpu0) / max(rep["ok"], 1)  # server CPU seconds per image (warm-up requests included: a small bias)
            return {"images_per_s": rep["images_per_s"], "errors": rep["errors"], "ok": rep["ok"], "p50_s": rep["latency_s"]["p50"],
                    "server_cpu_s_per_image": cpu, "decode_cpu_s_per_image": decode_cpu, "decode_share": min(decode_cpu / max(cpu, 1e-12), 1.0)}

        cost = {"photo": _decode_cpu_s(photos), "small": _decode_cpu_s(small)}
        paired = []
        for r in range(rounds):
            order = [("photo", photos), ("small", small)] if r % 2 == 0 else [("small", small), ("photo", photos)]
            res = {name: window(imgs, cost[name]) for name, imgs in order}
            paired.append(res)
        ratios = [p["photo"]["images_per_s"] / max(p["small"]["images_per_s"], 1e-9) for p in paired]
        out.update(
            {
                "backend": server_backend(server),
                "photo_vs_small_c32": statistics.median(ratios),
                "photo_vs_small_c32_rounds": ratios,
                "photo_images_per_s": statistics.median(p["photo"]["images_per_s"] for p in paired),
                "small_images_per_s": statistics.median(p["small"]["images_per_s"] for p in paired),
                "photo_decode_share": statistics.median(p["photo"]["decode_share"] for p in paired),
                "small_decode_share": statistics.median(p["small"]["decode_share"] for p in paired),
                "rounds_detail": paired,
            }
        )
    finally:
        server.stop()
        if tmp is not None:
            tmp.cleanup()
    return out


def server_backend(server: ServerProcess) -> str:
    import httpx

    return httpx.get(server.url + "/readyz", timeout=10).json().get("backend", "?")
