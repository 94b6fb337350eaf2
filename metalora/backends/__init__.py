"""Compute backends behind the service's engine: anything with `run(x, keys) -> Output`.

* `base`: the `Backend` protocol, `auto` -> a backend per device, the default graph cache.
* `export`: the ONNX graphs (full, prefix, tail, bridge; static-pad prefix and bridge).
* `onnx`: `OrtRunner`, ONNX Runtime sessions over a `Runtime`'s loaded adapters.
* `lowp`: `LowpRunner`, the shared prefix in fp32 | int8 | bf16 on CPU, and `auto`'s choice.
* `calib`, `quantize`, `cpu`: INT8 calibration and check images, ORT static quantisation, CPU flags.
* `accuracy`, `measure`: accuracy per precision and torch-vs-ORT throughput (benchmarks, research).

The torch backend is `metalora.runtime.Runtime` itself. Every path (graph cache, calibration
images) is an argument; nothing here reads the environment.
"""
