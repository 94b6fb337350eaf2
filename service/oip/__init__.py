"""The Open Inference Protocol (KServe v2 / Triton) face of the service: REST under `/v2` and gRPC.

`codec` turns wire formats into numpy tensors and back, `dataplane` says what a request does on
the shared `Service` core, `rest` and `grpc_server` are the two thin front doors, and `proto`
compiles the shipped `grpc_predict_v2.proto`.
"""
