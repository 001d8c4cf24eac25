"""The resolved deployment: one frozen tree, every ``auto`` settled, every value set once.

``cluster.spec.resolve`` builds it from a validated deploy spec (the YAML file, or the spec
that ``LLM(...)`` assembles from its keywords); nothing else constructs one in production. Each
role reads the sections it needs from the same tree, nothing is copied into a role's own type:

- prefill ranks: ``model``, ``prefill``, ``prefix_caching``, ``decode.block_size`` and
  ``decode.kv_cache.dtype`` (their cache, and the KV they send, are in decode's layout and format)
- decode replicas: ``model``, ``decode``
- the router: ``router``, ``decode.block_size``, ``link_prefix``
- the HTTP server and the controller: ``server``, ``model.served_name``, ``router``

Plain data, no torch and no Ray, so the router, the planner and the simulator read it too.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from pdserve.engine.speculative import SpeculativeSettings

CHUNKED_PREFILL_BUDGET = 2048  # vLLM's default step budget with chunked prefill (serving)
WHOLE_PREFILL_BUDGET = 8192  # prompt tokens of one prefill-only step (prefill priority)
KV_ACTIVATION_RESERVE = 0.1  # CUDA: share of the memory left after the weights kept for activations
# decode.attention_backend: sdpa gathers each sequence's blocks (any KV format), flex reads them
# in place (engine/paged_flex_attention.py)
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


def flex_page_problem(block_size: int) -> str | None:
    """Why flex's decode kernel cannot tile pages of ``block_size`` tokens (None if it can):
    its key tile is clipped to one page, and a Triton tile is a power of two of 16 or more."""
    if block_size >= 16 and block_size & (block_size - 1) == 0:
        return None
    return (
        f"tiles keys a page at a time and needs a power-of-two page of at least 16 tokens, "
        f"not decode.block_size {block_size}: write block_size: 16 (or 32, 64), or "
        "attention_backend: sdpa"
    )


@dataclass(frozen=True)
class ModelSettings:
    """What every worker loads, and where it runs."""

    path: str  # a local model directory or .gguf file (builtin: names already resolved)
    dtype: str = "auto"
    device: str = "cpu"  # "cpu" or "cuda"
    max_model_len: int | None = None  # None: the model's own
    quantization: str = "none"  # weight-only: "int8" (per output channel) or "int4" (group-wise)
    num_threads: int = 1  # torch intra-op threads per actor on CPU
    # Address the workers' rendezvous stores (TP group, KV links) bind to; "auto" = the node's
    # IP as Ray knows it, which is what peers on other nodes can reach.
    host: str = "auto"


@dataclass(frozen=True)
class KVCacheSize:
    """A decode replica's (or prefill rank's) KV cache: how big (exactly one of the three sizes is set) and in which
    dtype its entries are stored and sent ("auto": the model's)."""

    blocks: int | None = None
    memory_bytes: int | None = None
    memory_fraction: float | None = None  # CUDA: share of the GPU, weights included
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 | fp8_e4m3 | int8

    def __post_init__(self) -> None:
        given = [v for v in (self.blocks, self.memory_bytes, self.memory_fraction) if v is not None]
        if len(given) != 1:
            raise ValueError(f"{self}: set exactly one of blocks, memory_bytes, memory_fraction")

    def num_blocks(
        self,
        bytes_per_block: int,
        device_memory: tuple[int, int] | None = None,
        key: str = "decode.kv_cache",
    ) -> int:
        """Blocks of ``bytes_per_block`` that fit. ``device_memory`` (free, total bytes, read
        after the weights were loaded) sizes a ``memory_fraction`` cache: the fraction of the
        total less what is used already, less ``KV_ACTIVATION_RESERVE`` of that for activations."""
        if self.blocks is not None:
            return self.blocks
        if self.memory_bytes is not None:
            return self.memory_bytes // bytes_per_block
        assert self.memory_fraction is not None
        if device_memory is None:
            raise ValueError("a memory_fraction KV cache needs the device's memory (CUDA only)")
        free, total = device_memory
        budget = int(total * self.memory_fraction) - (total - free)
        if budget <= 0:
            raise ValueError(
                f"{key}.memory_fraction={self.memory_fraction} leaves no room for the "
                f"KV cache after the weights ({(total - free) / 2**30:.1f} GiB used of "
                f"{total / 2**30:.1f} GiB): raise the fraction or use a smaller model"
            )
        return int(budget * (1 - KV_ACTIVATION_RESERVE)) // bytes_per_block


@dataclass(frozen=True)
class PrefillSettings:
    """Prefill instances, each a tensor-parallel group of ranks with its own paged KV cache
    (``kv_cache``: each rank its head slice; the prefix cache when ``prefix_caching`` is on,
    and where a chunked prompt's earlier chunks wait for its later ones)."""

    instances: int = 1
    tensor_parallel_size: int = 1
    # prompt tokens one prefill step computes: whole prompts (a longer one runs alone), or,
    # with chunked_prefill, whole short prompts and chunks of long ones within it
    max_batch_tokens: int = 8192
    max_batch_size: int = 64
    # its size only: entries are stored in decode.kv_cache.dtype (the KV travels as decode holds it)
    kv_cache: KVCacheSize = field(default_factory=lambda: KVCacheSize(memory_bytes=512 << 20))
    chunked_prefill: bool = False
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, per rank
    # CUDA: each rank's share of a GPU (engine/device_memory.py); None until the deployment
    # starts and fits the workers to the cluster's GPUs (cluster/launch/gpu_fit.py)
    gpus_per_worker: float | None = None


@dataclass(frozen=True)
class DecodeSettings:
    """Decode replicas (colocated mode: the instances running both phases)."""

    instances: int = 1
    max_num_seqs: int = 64
    block_size: int = 16
    kv_cache: KVCacheSize = field(default_factory=lambda: KVCacheSize(memory_bytes=512 << 20))
    # colocated: tokens one step computes. Chunked: decode tokens + prefill chunks; else the
    # prompts of one prefill-only step (a longer prompt runs alone).
    max_num_batched_tokens: int = WHOLE_PREFILL_BUDGET
    chunked_prefill: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    gpus_per_worker: float | None = None  # CUDA: each replica's share of a GPU (as prefill's)
    kv_lease_s: float = 60.0  # reservations without KV, and stalled transfers, freed after it
    speculative: SpeculativeSettings | None = None  # speculative decoding; None: off
    # decode attention (one of ATTENTION_BACKENDS); auto stays auto here: flex on CUDA when the
    # KV cache holds the model's dtype, which only the loaded model tells (decode start-up)
    attention_backend: str = "auto"
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps (CPU never uses them)
    cudagraph_capture_sizes: tuple[int, ...] | None = None  # None: 1, 2, 4, ... max_num_seqs

    def __post_init__(self) -> None:
        problem = step_budget_problem(
            self.max_num_batched_tokens, self.max_num_seqs, self.chunked_prefill
        )
        if problem is not None:
            raise ValueError(f"max_num_batched_tokens {problem}")


@dataclass(frozen=True)
class RouterSettings:
    prefill_policy: str = "least_loaded"
    decode_policy: str = "most_free_blocks"
    max_queued_requests: int = 256  # admitted and not finished; above it: 429 + Retry-After
    max_migrations: int = 3  # moves to another decode replica after a death mid-stream
    max_prefill_retries: int = 3  # retries on another prefill instance after a death
    # self-healing (cluster/launch/healer.py): a dead instance is replaced after the backoff,
    # doubled with each restart of that instance, at most max_restarts times (0: never)
    restart_backoff_s: float = 1.0
    max_restarts: int = 5
    health_check_s: float = 2.0  # how often every live worker is asked whether it lives


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless configured: secure by default
    served_model_name: str = "pdserve"  # the id /v1/models lists and requests must name
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health needs "Bearer KEY"
    max_request_bytes: int = 1 << 20  # bodies above this get 413
    max_tokens_default: int = 16  # OpenAI's default for /v1/completions without max_tokens
    jobs_dir: str = ""  # where batch-job results are written ("" = no jobs API)


@dataclass(frozen=True)
class DeploymentConfig:
    """A whole deployment, resolved. ``prefill`` is None in colocated mode."""

    name: str
    model: ModelSettings
    prefill: PrefillSettings | None = field(default_factory=PrefillSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    kv_backend: str = "auto"  # one of kv_transfer.peers.BACKENDS
    prefix_caching: bool = True  # reuse KV blocks across requests, in both pools
    router: RouterSettings = field(default_factory=RouterSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    ray_address: str | None = None
    start_timeout_s: float = 600.0  # placing and starting every worker, at most
    # authenticates the members of every KV link and TP group (kv_transfer.auth): drawn afresh
    # each time a spec is resolved (`pdserve up`, `LLM(...)`), reaching workers with the tree
    link_secret: bytes = field(
        default_factory=lambda: secrets.token_bytes(32), repr=False, compare=False
    )

    @property
    def namespace(self) -> str:
        """The deployment's Ray namespace; two deployments differ in it."""
        return namespace_for(self.name)

    @property
    def link_prefix(self) -> str:
        """Names of this deployment's KV links and placement groups start with it."""
        return self.namespace

    @property
    def mode(self) -> str:
        return "colocated" if self.prefill is None else "disaggregated"

    @property
    def prefill_instances(self) -> int:
        return 0 if self.prefill is None else self.prefill.instances

    @property
    def prefill_tp(self) -> int:
        return 1 if self.prefill is None else self.prefill.tensor_parallel_size

    @property
    def num_actors(self) -> int:
        return self.prefill_instances * self.prefill_tp + self.decode.instances


def namespace_for(name: str) -> str:
    """The Ray namespace of the deployment called ``name`` (its controller is found there)."""
    return f"pdserve-{name}"


def step_token_budget(max_num_batched_tokens: int | None, max_num_seqs: int, chunked: bool) -> int:
    """A colocated instance's ``max_num_batched_tokens``, or its default for None (vLLM's):
    2048 (at least ``max_num_seqs``) with chunked prefill, 8192 without."""
    if max_num_batched_tokens is None:
        if not chunked:
            return WHOLE_PREFILL_BUDGET
        return max(CHUNKED_PREFILL_BUDGET, max_num_seqs)
    problem = step_budget_problem(max_num_batched_tokens, max_num_seqs, chunked)
    if problem is not None:
        raise ValueError(f"max_num_batched_tokens {problem}")
    return max_num_batched_tokens


def step_budget_problem(
    max_num_batched_tokens: int, max_num_seqs: int, chunked: bool
) -> str | None:
    """What is wrong with a step budget (the key's name left out), or None."""
    if max_num_batched_tokens < 1:
        return f"must be >= 1, got {max_num_batched_tokens}"
    if chunked and max_num_batched_tokens < max_num_seqs:
        return (
            f"must be at least max_num_seqs ({max_num_seqs}) with chunked prefill, got "
            f"{max_num_batched_tokens}: each step decodes every running sequence first"
        )
    return None


def resolve_host(host: str) -> str:
    """``auto`` -> this node's IP as Ray reports it (inside a Ray worker), else the host given."""
    if host != "auto":
        return host
    import ray  # imported here: the engine does not otherwise depend on Ray

    return str(ray.util.get_node_ip_address())
