"""The deploy spec's schema: pydantic models for the YAML edge, frozen, unknown keys rejected.

Each field validator raises ``ValueError`` with a message that says what to write instead, and
``spec_errors.describe_error`` turns each pydantic error into one line: the key path, then the
fix.
Values written ``auto`` stay ``auto`` here; ``spec.resolve`` settles them once at launch.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pdserve.cluster.config.errors import section_type
from pdserve.cluster.config.fields import (
    DEVICES,
    DTYPES,
    KV_BACKENDS,
    KV_CACHE_DTYPES,
    MODES,
    NAME_RE,
    QUANTIZATIONS,
    QUANTIZED_KV_DTYPES,
    AutoInt,
    CaptureSizes,
    GPUShare,
    Memory,
    NonEmpty,
    Positive,
    Resources,
    check,
    check_address,
    check_api_key,
    check_model_path,
    one_of,
)
from pdserve.engine.builtin_models import BUILTIN_PREFIX, DEFAULT_MODEL
from pdserve.engine.deploy_config import ATTENTION_BACKENDS, flex_page_problem
from pdserve.engine.speculative import SPEC_METHODS
from pdserve.router.policies import DECODE_POLICIES, PREFILL_POLICIES

LLM_KEYWORD = "llm"  # json_schema_extra key: the `LLM(...)` keyword that sets a field


def kw(default: Any, keyword: str) -> Any:
    """A field's default, and the `LLM(...)` keyword that sets it (one place per knob)."""
    return Field(default, json_schema_extra={LLM_KEYWORD: keyword})


class Section(BaseModel):
    """Base of every section: frozen, strict types (no "8" for 8), unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSection(Section):
    """Which checkpoint to serve, in which dtype, on which device."""

    path: Annotated[str, AfterValidator(check_model_path)] = BUILTIN_PREFIX + DEFAULT_MODEL
    dtype: Annotated[str, one_of(*DTYPES)] = kw("auto", "dtype")
    device: Annotated[str, one_of(*DEVICES)] = kw("auto", "device")
    max_model_len: AutoInt = kw("auto", "max_model_len")
    quantization: Annotated[str, one_of(*QUANTIZATIONS)] = kw("none", "quantization")
    served_name: NonEmpty = kw("auto", "served_model_name")


class _CacheSize(Section):
    """A KV cache's size: at most one of the three sizes; none given = auto."""

    accepts_auto: ClassVar[bool] = True  # the whole section may be written `auto` (errors say so)

    @model_validator(mode="before")
    @classmethod
    def _from_auto(cls, data: Any) -> Any:
        if data == "auto":
            return {}
        if isinstance(data, int) and not isinstance(data, bool):
            raise ValueError(f'write {{blocks: {data}}} for a block count or {{memory: "2GiB"}}')
        return data

    @model_validator(mode="after")
    def _at_most_one(self) -> _CacheSize:
        sizes = ("blocks", "memory", "memory_fraction")
        given = [k for k in sizes if getattr(self, k, None) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of blocks, memory or memory_fraction, not {given}")
        return self


class PrefillKVCache(_CacheSize):
    """Each prefill rank's KV cache (its head slice; entries in decode.kv_cache.dtype): the
    prefix cache, and room for the prompts being prefilled."""

    blocks: Positive | None = kw(None, "prefill_num_kv_blocks")
    memory: Memory = kw(None, "prefill_kv_cache_memory")
    memory_fraction: Annotated[float, Field(gt=0, le=1)] | None = None


class KVCache(_CacheSize):
    """Each decode replica's KV cache: at most one of the three sizes; none given = auto."""

    blocks: Positive | None = kw(None, "num_kv_blocks")
    memory: Memory = kw(None, "kv_cache_memory")
    memory_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    # auto: the model's dtype; fp8_e4m3 and int8 store (and send) KV compressed, scaled per token
    dtype: Annotated[str, one_of(*KV_CACHE_DTYPES)] = kw("auto", "kv_cache_dtype")


class PrefillSection(Section):
    """Prefill instances, each a tensor-parallel group of actors (one device each)."""

    instances: Positive = kw(1, "prefill_instances")
    # any size dividing the model's heads: resolve checks it against the model
    tensor_parallel_size: Positive = kw(1, "prefill_tensor_parallel_size")
    # tokens one prefill step computes (with chunked_prefill: short prompts and chunks)
    max_batch_tokens: Positive = kw(8192, "max_batch_tokens")
    max_batch_size: Positive = kw(64, "max_batch_size")
    kv_cache: PrefillKVCache = Field(default_factory=PrefillKVCache)
    # prompts over max_batch_tokens run in chunks, short prompts interleaved with them
    chunked_prefill: bool = kw(False, "prefill_chunked_prefill")
    resources: Resources = Field(default_factory=dict)
    # each rank's share of one GPU (Ray's fractional GPUs, and that share of its memory);
    # absent: a whole GPU each when the cluster has enough, else an equal share (gpu_fit.py)
    gpus_per_worker: GPUShare | None = kw(None, "prefill_gpus_per_worker")


class SpeculativeSection(Section):
    """``decode.speculative``: draft tokens verified in each decode step (vLLM's
    ``speculative_config``); see engine/speculative.py."""

    method: Annotated[str, one_of(*SPEC_METHODS)] = "ngram"
    num_speculative_tokens: Annotated[int, Field(ge=1, le=16)] = 4
    prompt_lookup_max: Annotated[int, Field(ge=1, le=64)] = 4
    prompt_lookup_min: Annotated[int, Field(ge=1, le=64)] = 2
    # method draft: a model sharing the target's tokenizer (a path or builtin:<name>), and
    # optionally only its first layers
    draft_model: str | None = None
    draft_num_layers: Positive | None = None
    # a sequence whose recent acceptance rate falls below this stops speculating (probing
    # again every probe_interval steps); 0 keeps it on
    min_acceptance_rate: Annotated[float, Field(ge=0, lt=1)] = 0.5
    probe_interval: Positive = 16
    # no speculation while this many sequences or more decode (None: at any batch size)
    disable_by_batch_size: Positive | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeSection:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be <= prompt_lookup_max")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("method draft needs draft_model: a model path or builtin:<name>")
        if self.method == "ngram" and (self.draft_model or self.draft_num_layers):
            raise ValueError("draft_model and draft_num_layers are for method draft only")
        return self


class DecodeSection(Section):
    """Decode replicas (one device each); in colocated mode, the colocated instances."""

    instances: Positive = kw(1, "decode_instances")
    max_num_seqs: Positive = kw(64, "max_num_seqs")
    block_size: Annotated[int, Field(ge=1, le=1024)] = kw(16, "block_size")
    kv_cache: KVCache = Field(default_factory=KVCache)
    resources: Resources = Field(default_factory=dict)
    # each replica's share of one GPU: 0.5 puts a prefill rank and a replica on one GPU;
    # absent: as prefill.gpus_per_worker
    gpus_per_worker: GPUShare | None = kw(None, "gpus_per_worker")
    # colocated: the instances prefill in chunks; disaggregated: the prefill pool does (as
    # prefill.chunked_prefill, within prefill.max_batch_tokens)
    chunked_prefill: bool = kw(False, "enable_chunked_prefill")
    # colocated mode only (spec._cross_check rejects it otherwise)
    max_num_batched_tokens: AutoInt = kw("auto", "max_num_batched_tokens")
    # a reservation whose KV has not started arriving after this many seconds is freed, and a
    # transfer that stalls this long mid-batch is aborted (its link dropped, its blocks freed)
    kv_lease_s: Annotated[float, Field(gt=0, le=86400)] = kw(60.0, "kv_lease_s")
    # speculative decoding (off when absent): n-gram prompt lookup or a draft model
    speculative: SpeculativeSection | None = kw(None, "speculative_config")
    # decode attention: sdpa gathers each sequence's blocks (any KV cache dtype), flex reads
    # them in place (KV cache in the model's dtype); auto: flex on CUDA when it can, else sdpa
    attention_backend: Annotated[str, one_of(*ATTENTION_BACKENDS)] = kw("auto", "attention_backend")
    # CUDA graphs for pure decode steps (flex only; CPU never uses them); true: none (vLLM's)
    enforce_eager: bool = kw(False, "enforce_eager")
    # batch sizes decode steps are padded to and captured at; auto: 1, 2, 4, ... max_num_seqs
    cudagraph_capture_sizes: CaptureSizes = kw(None, "cudagraph_capture_sizes")

    @model_validator(mode="after")
    def _attention_consistent(self) -> DecodeSection:
        if self.attention_backend == "flex" and self.kv_cache.dtype in QUANTIZED_KV_DTYPES:
            raise ValueError(
                "attention_backend: flex reads the KV cache in place and needs it in the "
                f"model's dtype, but kv_cache.dtype is {self.kv_cache.dtype}: write "
                "attention_backend: sdpa (or auto, which falls back to sdpa), or "
                "kv_cache.dtype: auto"
            )
        if self.attention_backend == "flex" and (problem := flex_page_problem(self.block_size)):
            raise ValueError(f"attention_backend: flex {problem}")
        over = [s for s in self.cudagraph_capture_sizes or () if s > self.max_num_seqs]
        if over:
            raise ValueError(
                f"cudagraph_capture_sizes: {over} exceed max_num_seqs ({self.max_num_seqs}), "
                "the most sequences a decode step holds: drop them or raise max_num_seqs"
            )
        return self


class KVTransferSection(Section):
    backend: Annotated[str, one_of(*KV_BACKENDS)] = kw("auto", "kv_transfer_backend")


class RouterSection(Section):
    prefill_policy: Annotated[str, one_of(*PREFILL_POLICIES)] = kw("least_loaded", "prefill_policy")
    decode_policy: Annotated[str, one_of(*DECODE_POLICIES)] = kw(
        "most_free_blocks", "decode_policy"
    )
    max_queued_requests: Positive = 256
    # times one request may move to another decode replica after its replica died mid-stream
    # (token replay: prompt + the tokens streamed so far prefilled again); 0: never
    max_migrations: Annotated[int, Field(ge=0)] = kw(3, "max_migrations")
    # times one request's prefill may be retried on another instance after its instance died
    max_prefill_retries: Annotated[int, Field(ge=0)] = kw(3, "max_prefill_retries")
    # self-healing: a dead prefill instance or decode replica is replaced after this many
    # seconds, doubled with each restart of that instance (at most 60 s), at most
    # max_restarts times per instance (0: never); live workers are asked every health_check_s
    restart_backoff_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    max_restarts: Annotated[int, Field(ge=0)] = 5
    health_check_s: Annotated[float, Field(gt=0, le=3600)] = 2.0


class ServerSection(Section):
    host: NonEmpty = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    api_key: Annotated[str | None, AfterValidator(check_api_key)] = None
    max_request_bytes: Annotated[int, Field(ge=1024)] = 1 << 20


class RaySection(Section):
    address: Annotated[str | None, AfterValidator(check_address)] = kw(None, "ray_address")
    num_threads_per_cpu_worker: Positive = kw(1, "num_threads")
    # how long a deployment's workers may take to be placed and started (Ray waits forever
    # for resources no node has free); vLLM waits as long for its engine
    start_timeout_s: Annotated[float, Field(gt=0, le=86400)] = kw(600.0, "start_timeout_s")


class DeploySpec(Section):
    """A whole deployment as written in YAML (see deploy/local.yaml and docs/operations.md)."""

    name: Annotated[
        str,
        check(
            lambda s: bool(NAME_RE.fullmatch(s)),
            "must be 1-32 characters of a-z, 0-9 and '-' (not at either end), e.g. my-model",
        ),
    ]
    mode: Annotated[str, one_of(*MODES)] = kw("disaggregated", "mode")
    # KV reuse across requests in both pools (vLLM v1's default); false turns it off
    prefix_caching: bool = kw(True, "enable_prefix_caching")
    model: ModelSection = Field(default_factory=ModelSection)
    prefill: PrefillSection | None = None  # None: defaults (disaggregated) or no pool (colocated)
    decode: DecodeSection = Field(default_factory=DecodeSection)
    kv_transfer: KVTransferSection = Field(default_factory=KVTransferSection)
    router: RouterSection = Field(default_factory=RouterSection)
    server: ServerSection = Field(default_factory=ServerSection)
    ray: RaySection = Field(default_factory=RaySection)

    @property
    def prefill_pool(self) -> PrefillSection:
        return self.prefill or PrefillSection()


def llm_keywords(root: type[BaseModel] = DeploySpec) -> dict[str, tuple[str, ...]]:
    """`LLM(...)` keyword -> the key path it sets, read off the schema's ``kw`` fields."""
    out: dict[str, tuple[str, ...]] = {}
    for name, field in root.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and LLM_KEYWORD in extra:
            out[str(extra[LLM_KEYWORD])] = (name,)
        nested = section_type(field.annotation)
        if nested is not None:
            out |= {k: (name, *path) for k, path in llm_keywords(nested).items()}
    return out
