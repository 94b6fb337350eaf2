"""What the protocol faces cost: one image per request through `/v1` (JSON, base64), `/v2` (binary
data and JSON) and gRPC, interleaved round by round on one real server, medians side by side.

    python -m bench.oip_latency [--rounds 30] [--adapter cifar10]

Sequential requests with `max_delay_ms=0`, so each is one batch of one image: the difference
between the rows is the front door (parsing, encoding, transport), not batching. Needs the dev
extra (`tritonclient[http,grpc]`) and scikit-image for the photo.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from service.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--adapter", default="cifar10")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    args = ap.parse_args()

    import skimage.data
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "JPEG")
    jpg = buf.getvalue()
    b64 = base64.b64encode(jpg).decode()
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(args.store, Path(tmp) / "server.log", adapters=args.adapter, gallery_dir=Path(tmp) / "g", max_delay_ms=0) as srv:
        web = httpx.Client(base_url=srv.url, timeout=60)
        http = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
        grpc = grpcclient.InferenceServerClient(srv.grpc_url)

        def image(mod, binary: bool):
            inp = mod.InferInput("image", [1], "BYTES")
            if binary:
                inp.set_data_from_numpy(np.array([jpg], dtype=object))
            else:  # JSON carries text: base64, as /v1 JSON does
                inp.set_data_from_numpy(np.array([b64], dtype=object), binary_data=False)
            return inp

        faces = {
            "/v1 JSON": lambda: web.post("/v1/predict", json={"adapter": args.adapter, "images": [b64], "top_k": 1}).raise_for_status(),
            "/v2 binary": lambda: http.infer(args.adapter, [image(httpclient, True)], outputs=[httpclient.InferRequestedOutput("label")]),
            "/v2 JSON": lambda: http.infer(args.adapter, [image(httpclient, False)], outputs=[httpclient.InferRequestedOutput("label", binary_data=False)]),
            "gRPC": lambda: grpc.infer(args.adapter, [image(grpcclient, True)], outputs=[grpcclient.InferRequestedOutput("label")]),
        }
        for call in faces.values():  # warm every path
            call()
        times: dict[str, list[float]] = {k: [] for k in faces}
        for _ in range(args.rounds):
            for name, call in faces.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        backend = web.get("/readyz").json()["backend"]
    ref = statistics.median(times["/v1 JSON"])
    print(f"backend {backend}, {args.rounds} interleaved rounds, one image per request")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:11s} median {m * 1000:6.1f} ms   ratio to /v1 {m / ref:.2f}")


if __name__ == "__main__":
    main()
