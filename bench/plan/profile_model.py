"""A hardware profile: fitted latency models plus what they were measured on. Pure (no torch).

`pdserve profile` writes it as JSON, `pdserve plan` reads it; the simulator asks it how long a
prefill batch, a decode step or a KV transfer takes. JSON layout (all times in ms)::

    {"version": 1, "hardware": {...}, "device": "cpu", "threads": 1,
     "model": {ModelShape}, "spec": {deploy spec as a mapping: the engine settings},
     "prefill": {"1": Fit, "2": Fit, ...},       # per measured TP degree, forward only
     "send_overhead": 0.05,                       # TP1 prefill slows by this share while sending
     "auto_kv_blocks": 32768,                     # decode KV blocks of an auto kv_cache here
     "kv_land_ms": 1.2,                           # prefill done -> KV written on decode
     "decode": Fit, "transfer": {"latency_ms", "bandwidth_gbps", "fit"},
     "overheads": {Overheads}, "tp_scaling": "measured: 1, 2" | "modeled ...",
     "samples": {"prefill": {...}, "decode": [...], "transfer": [...], ...}}
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.plan.latency_model import (
    Fit,
    TransferModel,
    chunk_features,
    decode_features,
    decode_knots,
    prefill_features,
)
from pdserve.engine.kv_format import row_bytes

PROFILE_VERSION = 1
# All-reduce start-up cost per call when a TP degree was not measured (gloo on a host / NCCL
# in a node are both tens of microseconds); the bytes go at the profiled link bandwidth.
ALLREDUCE_LATENCY_MS = 0.05


class ProfileError(ValueError):
    """A profile file that cannot be used; the message says how to make a usable one."""


@dataclass(frozen=True)
class ModelShape:
    """What the simulator needs to know of the model: sizes for KV bytes and TP traffic."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_model_len: int
    params: int = 0

    def kv_bytes_per_token(self, kv_heads: int | None = None, kv_dtype: str = "auto") -> int:
        """K and V of every layer for one token (all KV heads unless `kv_heads` is given), in
        KV-cache format `kv_dtype` ("auto": the model's dtype), scales included."""
        heads = self.num_kv_heads if kv_heads is None else kv_heads
        row = (
            self.head_dim * self.dtype_bytes
            if kv_dtype == "auto"
            else row_bytes(kv_dtype, self.head_dim)
        )
        return self.num_layers * 2 * heads * row

    @property
    def qkv_fraction(self) -> float:
        """Share of a layer's weight FLOPs done when its K/V exist (after the qkv projection):
        a KV-sending prefill can start that layer's send this far into the layer."""
        h, d = self.hidden_size, self.head_dim
        qkv = h * (self.num_heads + 2 * self.num_kv_heads) * d
        rest = self.num_heads * d * h + 3 * h * self.intermediate_size
        return qkv / (qkv + rest)


@dataclass(frozen=True)
class Overheads:
    """Fixed costs outside the model's forward passes, in ms, and where the numbers come from."""

    dispatch_ms: float = 0.0  # request sent -> queued for prefill (HTTP, tokenize, reserve RPC)
    return_ms: float = 0.0  # token produced -> client has it (Ray reply, SSE)
    step_ms: float = 0.0  # per decode-replica step beyond the timed engine call
    # decode steps: [batch, ms] the deployment's step took beyond the in-process one, measured
    # at a few batch sizes; interpolated between them, the last value beyond (step_ms if none)
    decode_excess_ms: tuple[tuple[int, float], ...] = ()
    prefill_scale: float = 1.0  # a prefill inside the deployment takes this times the profiled
    stream_cpu_ms: float = 0.0  # CPU the controller and client spend per streamed token
    source: str = "none"

    def decode_excess(self, batch: int) -> float:
        points = sorted(self.decode_excess_ms)
        if not points:
            return self.step_ms
        for (b0, e0), (b1, e1) in itertools.pairwise(points):
            if batch <= b1:
                return e0 + (e1 - e0) * max(0, batch - b0) / (b1 - b0)
        return points[-1][1]


@dataclass(frozen=True)
class Profile:
    model: ModelShape
    prefill: Mapping[int, Fit]  # TP degree -> fit of the forward pass
    decode: Fit
    transfer: TransferModel
    overheads: Overheads = field(default_factory=Overheads)
    send_overhead: float = 0.0
    auto_kv_blocks: int = 0  # KV blocks a decode replica gets from an auto kv_cache here
    kv_land_ms: float | None = None  # prefill done -> its KV written on decode; None: latency
    device: str = "cpu"
    threads: int = 1
    hardware: Mapping[str, Any] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)
    samples: Mapping[str, Any] = field(default_factory=dict)
    tp_scaling: str = "measured: 1"
    # CPU host: how much slower a worker runs per neighbour computing on another core (shared
    # cache and memory bus; bench.profile.corun); 0 on GPUs, where each has its own device
    corun: float = 0.0
    corun_pairs: Mapping[str, float] = field(default_factory=dict)  # "decode|prefill": ...

    def __post_init__(self) -> None:
        if 1 not in self.prefill:
            raise ProfileError("the profile has no TP 1 prefill fit: re-run pdserve profile")

    # -- latencies ---------------------------------------------------------------------------

    def prefill_ms(self, lens: Sequence[int], tp: int = 1) -> float:
        """One forward over a batch of prompts at TP degree `tp` (no KV sending)."""
        fit = self.prefill.get(tp)
        if fit is not None:
            return max(fit.predict(prefill_features(lens)), 0.0)
        return self._scaled_prefill_ms(lens, tp)

    def _scaled_prefill_ms(self, lens: Sequence[int], tp: int) -> float:
        """An unmeasured TP degree: the TP1 fit's work terms split over the ranks, fixed terms
        kept, plus two all-reduces a layer of [tokens, hidden] at the link's bandwidth."""
        fit = self.prefill[1]
        x = prefill_features(lens)
        fixed = sum(c * v for c, v, f in zip(fit.coef, x, fit.features) if f in ("const", "seqs"))
        work = fit.predict(x) - fixed
        tokens = sum(lens)
        ring = 2 * (tp - 1) / tp * tokens * self.model.hidden_size * self.model.dtype_bytes
        allreduce = 2 * self.model.num_layers * (ALLREDUCE_LATENCY_MS + self.transfer.wire_ms(ring))
        return fixed + work / tp + allreduce

    @property
    def land_ms(self) -> float:
        """From a prefill batch's end (its sends flushed) to its KV written on decode."""
        return self.transfer.latency_ms if self.kv_land_ms is None else self.kv_land_ms

    def decode_ms(self, batch: int, context_sum: int) -> float:
        """One decode step of `batch` seqs holding `context_sum` tokens in all."""
        x = decode_features(batch, context_sum, self._decode_knots)
        return max(self.decode.predict(x), 0.0)

    @functools.cached_property
    def _decode_knots(self) -> list[int] | None:
        return decode_knots(self.decode)

    def step_ms(self, batch: int, context_sum: int, chunks: Sequence[tuple[int, int]]) -> float:
        """One decode-replica step: a decode batch and prompt chunks [start, end) (local
        prefill, recompute) in one forward, plus what the deployment's step costs beyond the
        engine's. Mixed, the chunks add their prefill work terms to the decode step; the
        forward's fixed cost counts once."""
        o = self.overheads
        ms = self.decode_ms(batch, context_sum) + o.decode_excess(batch) if batch else o.step_ms
        if chunks:
            fit = self.prefill[1]
            work = fit.predict(chunk_features(chunks))
            work -= fit.coefficient("const") if batch else 0.0
            ms += max(work, 0.0) * o.prefill_scale
        return ms

    # -- JSON --------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        transfer = self.transfer
        return {
            "version": PROFILE_VERSION,
            "hardware": dict(self.hardware),
            "device": self.device,
            "threads": self.threads,
            "model": asdict(self.model),
            "spec": dict(self.spec),
            "prefill": {str(tp): fit.to_json() for tp, fit in sorted(self.prefill.items())},
            "send_overhead": self.send_overhead,
            "auto_kv_blocks": self.auto_kv_blocks,
            "kv_land_ms": self.kv_land_ms,
            "decode": self.decode.to_json(),
            "transfer": {
                "latency_ms": transfer.latency_ms,
                "bandwidth_gbps": transfer.bandwidth_gbps,
                "fit": transfer.fit.to_json() if transfer.fit else None,
            },
            "overheads": asdict(self.overheads),
            "tp_scaling": self.tp_scaling,
            "corun": self.corun,
            "corun_pairs": dict(self.corun_pairs),
            "samples": dict(self.samples),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        if data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"profile version {data.get('version')!r} is not {PROFILE_VERSION}: "
                "re-run pdserve profile with this pdserve"
            )
        try:
            t = data["transfer"]
            return cls(
                model=ModelShape(**data["model"]),
                prefill={int(tp): Fit.from_json(f) for tp, f in data["prefill"].items()},
                decode=Fit.from_json(data["decode"]),
                transfer=TransferModel(
                    float(t["latency_ms"]),
                    float(t["bandwidth_gbps"]),
                    Fit.from_json(t["fit"]) if t.get("fit") else None,
                ),
                overheads=_overheads(data.get("overheads", {})),
                send_overhead=float(data.get("send_overhead", 0.0)),
                auto_kv_blocks=int(data.get("auto_kv_blocks", 0)),
                kv_land_ms=_optional_float(data.get("kv_land_ms")),
                device=str(data.get("device", "cpu")),
                threads=int(data.get("threads", 1)),
                hardware=data.get("hardware", {}),
                spec=data.get("spec", {}),
                samples=data.get("samples", {}),
                tp_scaling=str(data.get("tp_scaling", "")),
                corun=float(data.get("corun", 0.0)),
                corun_pairs={k: float(v) for k, v in data.get("corun_pairs", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"malformed profile ({e!r}): re-run pdserve profile") from None

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise ProfileError(
                f"{path}: cannot read it ({e.strerror}); run pdserve profile"
            ) from None
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: not JSON ({e})") from None
        return cls.from_json(data)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _overheads(data: Mapping[str, Any]) -> Overheads:
    excess = tuple((int(b), float(ms)) for b, ms in data.get("decode_excess_ms", ()))
    return Overheads(**{**data, "decode_excess_ms": excess})
