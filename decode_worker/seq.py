"""A sequence on a decode replica, its states, the scheduler's per-step answer, and the
scheduler's errors: the nouns `DecodeScheduler` works on. Pure Python."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SchedulerError(RuntimeError):
    """The worker broke the scheduler's protocol (unknown seq, duplicate id, missed
    `on_step_done`, a seq past its length limit that was not finished)."""


class PromptTooLongError(ValueError):
    """A prompt that leaves no room to generate within max_model_len; reject the request."""


class SeqStatus(enum.Enum):
    NEW = "new"  # built by the worker, not activated yet
    READY = "ready"  # prompt K/V cached (arrived by transfer), waiting to join the batch
    RUNNING = "running"  # in the batch: holds blocks for every cached token
    PREEMPTED = "preempted"  # lost its blocks; waits to be recomputed
    FINISHED = "finished"  # finished or aborted; the scheduler has forgotten it


@dataclass(eq=False)
class DecodeSeq:
    """One request on a decode replica. `token_ids` = prompt + generated tokens; the first
    generated token comes from prefill. Identity, not value, makes two seqs equal."""

    seq_id: int
    prompt_len: int
    max_tokens: int
    token_ids: list[int]
    num_cached: int = 0
    status: SeqStatus = SeqStatus.NEW
    arrival: int = -1  # activation order on this replica; FCFS key of the recompute queue
    # prefix caching: the chained hashes of its leading full blocks of cached tokens, kept by
    # the engine (tokens are only appended, so the chain outlives a preemption)
    block_hashes: list[int] = field(default_factory=list)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len


@dataclass
class ScheduleOutput:
    """What the worker runs this step (see DecodeScheduler for the protocol)."""

    decode: list[DecodeSeq] = field(default_factory=list)
    recompute: list[DecodeSeq] = field(default_factory=list)
    preempted: list[DecodeSeq] = field(default_factory=list)
    # seq id -> leading positions of a recompute found in the prefix cache (absent: none)
    recompute_from: dict[int, int] = field(default_factory=dict)
    # seq id -> draft tokens a decode seq verifies this step (slots taken; absent: none)
    lookahead: dict[int, int] = field(default_factory=dict)

    def recompute_start(self, seq: DecodeSeq) -> int:
        """The first position a recompute computes (the ones before are cached blocks)."""
        return self.recompute_from.get(seq.seq_id, 0)

    @property
    def num_tokens(self) -> int:
        """Tokens this step computes: one per decode seq and one per draft, all but the last for
        a recompute (less its cached prefix)."""
        recompute = sum(len(s.token_ids) - 1 - self.recompute_start(s) for s in self.recompute)
        return len(self.decode) + sum(self.lookahead.values()) + recompute
