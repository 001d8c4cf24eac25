"""Speculative decoding: its settings, the n-gram proposer, the acceptance rule and counters.
Pure Python (no torch): the decode engine asks a proposer for draft tokens, the runner scores
them in the decode step (k + 1 query positions per sequence over the paged cache), and
`accept` keeps the prefix the target model agrees with.

The acceptance rule. Every proposer here is deterministic: its k drafts are a function of the
tokens so far, so its proposal distribution q is a point mass on each draft d_i. The standard
rule (Leviathan et al. 2023; Chen et al. 2023) accepts d_i with probability min(1, p(d_i) /
q(d_i)) = p(d_i) and, on a rejection, draws from norm(max(0, p - q)) = p without d_i. That is
exactly: draw y_i from the target's processed distribution p_i (the sampler's own draw, with
penalties, logit_bias, min_tokens, top-k/top-p and the request's seed), accept d_i iff y_i ==
d_i, and on the first mismatch emit y_i instead. P(emit t) = p(t) at every position, so the
output is distributed as non-speculative sampling; with a seed it is the same token sequence,
since the draw for output number j uses the same uniforms (``sampling.step_seed``) and the same
logits either way. Greedy is the temperature-0 case: accept while d_i is the argmax. If all k
drafts are accepted, the last position's draw y_k is a bonus token: k + 1 tokens from one step.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

SPEC_METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16  # k: drafts one sequence may verify in one step


@dataclass(frozen=True)
class SpeculativeSettings:
    """``decode.speculative`` in the deploy spec (vLLM's ``speculative_config``)."""

    method: str = "ngram"  # ngram: prompt lookup; draft: a smaller model on the decode replica
    num_speculative_tokens: int = 4  # k: drafts scored per sequence and step
    prompt_lookup_max: int = 4  # ngram: the longest suffix matched against earlier tokens
    prompt_lookup_min: int = 2  # ngram: the shortest
    draft_model: str | None = None  # draft: a model sharing the target's tokenizer
    draft_num_layers: int | None = None  # draft: keep only its first layers (None: all)
    # a sequence whose recent acceptance rate falls below this stops speculating, and tries
    # again every `probe_interval` steps (0 disables the switch). 0.5: on a CPU a batch of 16
    # is compute-bound, and drafts accepted less often than that cost more than they save
    min_acceptance_rate: float = 0.5
    probe_interval: int = 16
    # no speculation while this many sequences or more decode (vLLM's disable_by_batch_size)
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative method {self.method!r}: must be one of {SPEC_METHODS}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs draft_model (a model path)")
        if not 0.0 <= self.min_acceptance_rate < 1.0:
            raise ValueError("min_acceptance_rate must be in [0, 1)")


def ngram_propose(tokens: Sequence[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup (vLLM's ngram proposer): find the latest earlier occurrence of the last n
    tokens (n from n_max down to n_min) and propose the up to k tokens that followed it.

    The search runs in C: tokens packed as 4-byte words, ``bytes.rfind`` for the suffix, and a
    hit that does not start on a word boundary is skipped."""
    total = len(tokens)
    if total < n_min + 1 or k < 1:
        return []
    packed = array("i", tokens).tobytes()
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        needle = packed[4 * (total - n) :]
        end = 4 * (total - 1)  # the match must end before the suffix's own last token
        while True:
            at = packed.rfind(needle, 0, end)
            if at < 0:
                break
            if at % 4 == 0:
                start = at // 4 + n
                return list(tokens[start : start + k])
            end = at + len(needle) - 1
    return []


def accept(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The tokens a verified step emits: the drafts the target's draws agree with, then the
    first draw that disagrees (or the bonus draw after all k): ``sampled`` has len(drafts) + 1
    draws, draw i made with drafts[:i] as its prefix (module docstring)."""
    assert len(sampled) == len(drafts) + 1, (len(drafts), len(sampled))
    n = 0
    while n < len(drafts) and sampled[n] == drafts[n]:
        n += 1
    return list(sampled[: n + 1])


@dataclass
class SpecCounters:
    """Per replica (vLLM's spec-decode metrics): drafts proposed and accepted, tokens emitted by
    verified steps, and the number of verified (sequence, step) pairs."""

    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    verified: int = 0

    def merge(self, other: SpecCounters) -> None:
        """Add another engine's counts to these."""
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.verified += other.verified

    def add(self, num_drafts: int, num_emitted: int) -> None:
        self.proposed += num_drafts
        self.accepted += num_emitted - 1
        self.emitted += num_emitted
        self.verified += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verified step, the bonus or corrected token included (1 .. k + 1)."""
        return self.emitted / self.verified if self.verified else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "spec_proposed": self.proposed,
            "spec_accepted": self.accepted,
            "spec_emitted": self.emitted,
            "spec_verified": self.verified,
            "spec_acceptance_rate": round(self.acceptance_rate, 4),
            "spec_mean_accepted_length": round(self.mean_accepted_length, 4),
        }


class AcceptanceGate:
    """Per sequence: speculate while its recent acceptance rate (an exponential average over
    verified steps) stays at or above ``min_rate``; below it, try again every ``probe`` steps
    (as vLLM and SGLang switch speculation off where it does not pay)."""

    def __init__(self, min_rate: float, probe: int, decay: float = 0.7) -> None:
        self.min_rate = min_rate
        self.probe = max(1, probe)
        self.decay = decay
        self._rate: dict[int, float] = {}
        self._idle: dict[int, int] = {}  # steps since a switched-off sequence last speculated

    def allows(self, seq_id: int) -> bool:
        rate = self._rate.get(seq_id)
        if rate is None or rate >= self.min_rate or self.min_rate <= 0:
            return True
        idle = self._idle.get(seq_id, 0) + 1
        self._idle[seq_id] = idle % self.probe
        return idle >= self.probe

    def length(self, seq_id: int, k: int) -> int:
        """Drafts worth proposing: a run of r / (1 - r) accepted drafts is expected at rate
        r, and each draft past it mostly costs compute (k until the sequence has a rate)."""
        rate = self._rate.get(seq_id)
        if rate is None or rate >= 1.0:
            return k
        return max(1, min(k, 1 + int(rate / (1.0 - rate))))

    def record(self, seq_id: int, num_drafts: int, num_accepted: int) -> None:
        step_rate = num_accepted / num_drafts
        old = self._rate.get(seq_id)
        self._rate[seq_id] = (
            step_rate if old is None else self.decay * old + (1 - self.decay) * step_rate
        )

    def forget(self, seq_id: int) -> None:
        self._rate.pop(seq_id, None)
        self._idle.pop(seq_id, None)


class Proposer(Protocol):
    """Where drafts come from (the n-gram lookup, or a draft model on the decode replica)."""

    def lookahead(self, seq_id: int, token_ids: Sequence[int], k: int) -> int:
        """Slots to take for ``seq_id``'s drafts this step (at most k)."""

    def propose(self, wanted: Sequence[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """Drafts for each (seq id, tokens so far, slots taken), at most that many each."""

    def forget(self, seq_id: int) -> None:
        """``seq_id`` is gone: drop what is kept for it."""


class NgramProposer:
    """Prompt lookup as the engine's proposer: drafts come from the tokens alone, so they are
    found when the scheduler asks how many slots a sequence needs (`lookahead`)."""

    def __init__(self, settings: SpeculativeSettings) -> None:
        self.settings = settings
        self._found: dict[int, list[int]] = {}

    def lookahead(self, seq_id: int, token_ids: Sequence[int], k: int) -> int:
        s = self.settings
        found = ngram_propose(token_ids, k, s.prompt_lookup_max, s.prompt_lookup_min)
        self._found[seq_id] = found
        return len(found)

    def propose(self, wanted: Sequence[tuple[int, Sequence[int], int]]) -> list[list[int]]:
        """Drafts for each (seq id, tokens, slots taken) of this step."""
        return [self._found.pop(seq_id)[:k] for seq_id, _, k in wanted]

    def forget(self, seq_id: int) -> None:
        self._found.pop(seq_id, None)
