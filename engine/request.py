"""Request-level types shared by the router and both workers (one dataclass per message)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.load import DecodeLoad
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sampling_types import SamplingRow, TokenLogprobs


def replay_row(sampling: SamplingParams, tokens: tuple[int, ...], replayed: int) -> SamplingRow:
    """The sampling row of ``tokens`` whose last ``replayed`` are outputs already streamed (a
    request migrated by token replay): they count as outputs, so a seeded draw, penalties,
    min_tokens and max_tokens go on where the dead replica stopped."""
    cut = len(tokens) - replayed
    return SamplingRow(sampling, tokens[:cut], tokens[cut:])


@dataclass(frozen=True)
class PrefillItem:
    """Router -> prefill instance: prefill this prompt and ship its KV to ``decode_instance``."""

    transfer_id: int
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    decode_instance: int
    block_ids: tuple[int, ...]  # reserved on the decode replica before dispatch
    # leading blocks of block_ids whose KV the decode replica already holds (its prefix cache):
    # only the prompt's tokens from decode_cached_blocks * block_size on are sent
    decode_cached_blocks: int = 0
    # token replay: the prompt's last num_replayed tokens are outputs streamed before a
    # migration (the first token sampled here is output number num_replayed)
    num_replayed: int = 0


@dataclass(frozen=True)
class Reservation:
    """Decode replica -> router: the blocks held for a prompt's KV, the first
    ``cached_blocks`` of them already holding it (prefix cache hits, shared with others)."""

    block_ids: tuple[int, ...]
    cached_blocks: int = 0


@dataclass(frozen=True)
class PrefillResult:
    """Prefill instance -> router: the first token, sampled from the last prompt position."""

    transfer_id: int
    first_token: int
    logprobs: TokenLogprobs | None
    queue_s: float  # waiting in the prefill queue
    compute_s: float  # its first step's start to its last's end (forward passes, KV sends)
    error: str | None = None
    # of compute_s, the time a KV-sending rank waited after its forward pass for its KV sends to
    # leave: the part of the transfer that compute did not hide (the slowest rank's)
    kv_wait_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens found in the prefill instance's prefix cache


@dataclass(frozen=True)
class DecodeRequest:
    """Router -> decode replica at reservation time: everything decode needs besides the KV."""

    transfer_id: int
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    local_prefill: bool = False  # colocated: this replica prefills the prompt itself
    num_replayed: int = 0  # the prompt's last tokens that are outputs (a migrated request)


@dataclass
class StepDelta:
    """Decode replica -> router: tokens generated since the last delta of one request."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    kv_bytes: int = 0  # set once, when the request's KV has landed
    kv_reused_bytes: int = 0  # set then too: the prompt's KV found in the prefix cache
    transfer_s: float = 0.0
    load: DecodeLoad | None = None

    def merge(self, other: StepDelta) -> None:
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.finish_reason = self.finish_reason or other.finish_reason
        self.error = self.error or other.error
        self.kv_bytes += other.kv_bytes
        self.kv_reused_bytes += other.kv_reused_bytes
        self.transfer_s += other.transfer_s
        self.load = other.load or self.load


@dataclass
class RequestMetrics:
    """Per-request latencies in seconds (vLLM's definitions)."""

    arrival_time: float
    queue_s: float = 0.0  # router admission + prefill queue
    prefill_s: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    kv_bytes: int = 0  # KV sent to decode
    kv_reused_bytes: int = 0  # KV decode already held (prefix cache): not sent, not computed
    cached_tokens: int = 0  # prompt tokens its prefill did not compute: found in a prefix cache
    decode_cached_tokens: int = 0  # prompt tokens decode found in its prefix cache (KV not sent)
    transfer_s: float = 0.0
    kv_wait_s: float = 0.0  # of prefill_s: waiting for the KV sends to leave after the forward
    num_output_tokens: int = 0

    @property
    def tpot(self) -> float:
        """(E2E - TTFT) / (output tokens - 1); 0 for a single-token output."""
        if self.num_output_tokens <= 1:
            return 0.0
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestMetrics
    logprobs: list[TokenLogprobs | None] | None = None
