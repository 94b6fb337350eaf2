"""The JSON shapes of the Open Inference Protocol REST API (KServe predict API v2), for responses
and the OpenAPI document. Parsing of infer bodies is `codec.parse_rest` (JSON + binary tail)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ProtocolError(BaseModel):
    error: str = Field(description="what went wrong, for people")
    code: str = Field(description="stable machine-readable code (a MetaLoRA addition; the protocol asks only for `error`)")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 = any size")


class ModelMetadata(BaseModel):
    name: str = Field(description="the adapter (`base` = the frozen backbone)")
    versions: list[str] = Field(description="bundle versions in the store (none for `base`)")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ConfigReshape(BaseModel):
    shape: list[int]


class ConfigTensor(BaseModel):
    name: str
    data_type: str = Field(description="Triton's `TYPE_*` names: TYPE_STRING (= BYTES), TYPE_FP32, TYPE_BOOL")
    dims: list[int] = Field(description="the shape without the batch dimension; -1 = any size")
    reshape: ConfigReshape | None = Field(None, description="`{\"shape\": []}`: one element per batch item, sent as [N] (or [N, 1])")
    optional: bool | None = Field(None, description="inputs only: true for both, a request sends one of them (`image` or `pixels`)")


class ModelConfig(BaseModel):
    """Triton's model-configuration extension (`model_config.proto` as JSON), the fields this service has."""

    name: str
    platform: str
    backend: str
    max_batch_size: int = Field(description="images per request (`METALORA_MAX_IMAGES`)")
    input: list[ConfigTensor]
    output: list[ConfigTensor]


class StatisticDuration(BaseModel):
    count: int
    ns: int = Field(description="cumulative nanoseconds")


class InferStatistics(BaseModel):
    success: StatisticDuration = Field(description="requests answered, whole (decode, queue, compute)")
    fail: StatisticDuration = Field(description="requests that failed")
    queue: StatisticDuration = Field(description="per image: the wait in the batcher's queue")
    compute_input: StatisticDuration = Field(description="not measured apart: compute_infer's count, 0 ns")
    compute_infer: StatisticDuration = Field(description="per image: its share of its batch's forward")
    compute_output: StatisticDuration = Field(description="not measured apart: compute_infer's count, 0 ns")


class ModelStatistics(BaseModel):
    name: str
    version: str = Field(description="the bundle version (empty for `base`)")
    last_inference: int = Field(description="ms since the epoch of the last request; 0: none yet")
    inference_count: int = Field(description="images answered")
    execution_count: int = Field(description="requests answered")
    inference_stats: InferStatistics
    batch_stats: list[dict[str, Any]] = Field(description="empty: batches mix adapters, so they are not per model")


class ModelStatisticsResponse(BaseModel):
    """Triton's statistics extension."""

    model_stats: list[ModelStatistics]


class InferInput(BaseModel):
    name: str = Field(description="`image` (BYTES [N]) or `pixels` (FP32 [N, 3, S, S], the model input; or UINT8 [N, H, W, 3], RGB)")
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` when the data follows the JSON as binary")
    data: list[Any] | None = Field(None, description="row-major elements, flat or nested; `image` elements are base64 strings in JSON")


class InferRequestedOutput(BaseModel):
    name: str = Field(description="`probabilities`, `embedding`, `label` or (calibrated bundles) `unknown`")
    parameters: dict[str, Any] | None = Field(None, description="`binary_data` (bool), `classification` (top-k, on `probabilities`)")


class InferRequestBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_output`: every output as binary unless it says otherwise")
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput] | None = Field(None, description="default: every output the model has")


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


class RepositoryIndexRequest(BaseModel):
    repository_name: str | None = None
    ready: bool = Field(False, description="true: only models loaded now")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY (on the device) or UNAVAILABLE")
    reason: str
