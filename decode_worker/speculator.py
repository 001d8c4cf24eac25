"""The decode engine's speculative decoding (``decode.speculative``): which sequences propose
drafts this step and how many, the drafts themselves, what a verified step emits, the
per-sequence acceptance gate and the replica's counters. Pure Python; the proposer it is given
may run a draft model (``draft_proposer.py``). The rule and the proposers: engine/speculative.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pdserve.decode_worker.scheduler import DecodeScheduler
from pdserve.decode_worker.seq import DecodeSeq, ScheduleOutput
from pdserve.decode_worker.step import EngineLimits, HeldRequest
from pdserve.engine.speculative import (
    AcceptanceGate,
    NgramProposer,
    Proposer,
    SpecCounters,
    SpeculativeSettings,
    accept,
)


class Speculator:
    """Owned by a `DecodeEngine` built with ``limits.speculative``."""

    def __init__(
        self,
        settings: SpeculativeSettings,
        limits: EngineLimits,
        scheduler: DecodeScheduler,
        held: Mapping[int, HeldRequest],
        proposer: Proposer | None = None,
    ) -> None:
        if proposer is None:
            if settings.method != "ngram":
                raise ValueError(f"speculative method {settings.method!r} needs its proposer")
            proposer = NgramProposer(settings)
        self.settings = settings
        self.limits = limits
        self.scheduler = scheduler
        self.held = held  # the engine's requests, by transfer id
        self.proposer = proposer
        self.counters = SpecCounters()
        self.gate = AcceptanceGate(settings.min_acceptance_rate, settings.probe_interval)

    def lookahead(self, seq: DecodeSeq) -> int:
        """Drafts ``seq`` may verify this step: up to k, none past its max_tokens or the model's
        context, none while its acceptance gate is closed, fewer while it accepts few."""
        s, req = self.settings, self.held[seq.seq_id].req
        left_out = req.sampling.max_tokens - seq.num_output - req.num_replayed
        left_ctx = self.limits.max_model_len - len(seq.token_ids)
        k = min(s.num_speculative_tokens, left_out - 1, left_ctx)
        crowded = s.disable_by_batch_size or self.limits.max_num_seqs + 1
        if k < 1 or self.scheduler.num_running >= crowded or not self.gate.allows(seq.seq_id):
            return 0
        k = self.gate.length(seq.seq_id, k)
        return self.proposer.lookahead(seq.seq_id, seq.token_ids, k)

    def propose(self, out: ScheduleOutput) -> dict[int, list[int]]:
        """The drafts of the decode seqs that got slots for them."""
        wanted = [
            (s.seq_id, s.token_ids, out.lookahead[s.seq_id])
            for s in out.decode
            if s.seq_id in out.lookahead
        ]
        drafts = self.proposer.propose(wanted)
        return {sid: d for (sid, _, _), d in zip(wanted, drafts) if d}

    def emitted(self, seq_id: int, drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
        """What a verified step emits for ``seq_id`` (counted, and fed to its gate)."""
        tokens = accept(drafts, sampled)
        self.counters.add(len(drafts), len(tokens))
        self.gate.record(seq_id, len(drafts), len(tokens) - 1)
        return tokens

    def forget(self, tid: int) -> None:
        """A request left the engine: its gate and proposer state (a draft's blocks) go too."""
        self.gate.forget(tid)
        self.proposer.forget(tid)
