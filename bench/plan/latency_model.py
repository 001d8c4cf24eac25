"""Latency models fitted to profile samples by least squares. Pure numpy: no torch, no Ray.

    prefill_ms(lens)         = a + b·Σlen + c·Σlen² + d·len(lens)   one forward over a batch
                               (a chunk [s, e) of a prompt counts e - s tokens and e² - s²)
    decode_ms(batch, ctx)    = base(batch) + c·Σcontext             one continuous-batching step
                               base: piecewise linear through the measured batch sizes
                               (older profiles: a + b·batch)
    transfer_ms(bytes)       = latency + bytes / bandwidth          one KV transfer over a link

The decode step is not linear in the batch size: on a CPU, BLAS runs a one-row product as a
matrix-vector product and two to a few rows at nearly twice its cost (measured here: 18 ms at
batch 1, 33 ms at batches 2 and 4), and on a GPU a step is flat until compute saturates. So
each measured batch size gets its own base cost (a "knot"), interpolated linearly between knots.

Coefficients are kept non-negative (a latency never shrinks with more work): the fit is exact
non-negative least squares (Lawson-Hanson, `nnls`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PREFILL_FEATURES = ("const", "tokens", "sum_len_sq", "seqs")
DECODE_FEATURES = ("const", "batch", "context_sum")
TRANSFER_FEATURES = ("const", "bytes")


class FitError(ValueError):
    """Too few or degenerate samples to fit a model; the message says what to measure."""


@dataclass(frozen=True)
class Fit:
    """y ≈ Σ coef[i]·x[i] over named features, with how well it matched its own samples."""

    features: tuple[str, ...]
    coef: tuple[float, ...]
    r2: float  # coefficient of determination on the samples
    max_rel_err: float  # max |pred - y| / y over the samples
    mean_rel_err: float
    num_samples: int

    def predict(self, x: Sequence[float]) -> float:
        return float(np.dot(self.coef, x))

    def coefficient(self, name: str) -> float:
        return self.coef[self.features.index(name)]

    def to_json(self) -> dict[str, Any]:
        return {
            "coef": dict(zip(self.features, self.coef)),
            "r2": self.r2,
            "max_rel_err": self.max_rel_err,
            "mean_rel_err": self.mean_rel_err,
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fit:
        coef = data["coef"]
        return cls(
            tuple(coef),
            tuple(float(v) for v in coef.values()),
            float(data["r2"]),
            float(data["max_rel_err"]),
            float(data["mean_rel_err"]),
            int(data["num_samples"]),
        )


def fit_nonnegative(features: Sequence[str], x: np.ndarray, y: np.ndarray) -> Fit:
    """Least squares of y on the columns of x with every coefficient >= 0 (exact: `nnls`).

    x: [samples, features], y: [samples]; a column the constraint drops gets coefficient 0.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, k = x.shape
    if n < k:
        raise FitError(f"{n} samples cannot fit {k} coefficients ({', '.join(features)})")
    scale = np.linalg.norm(x, axis=0)
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)) or not np.any(scale > 0):
        raise FitError(f"no non-negative fit of {', '.join(features)}: samples look degenerate")
    scale[scale == 0] = 1.0  # an all-zero column: its coefficient stays 0
    coef = nnls(x / scale, y) / scale  # columns of one norm: features differ by 1e7 in size
    return _fit_of(tuple(features), coef, x, y)


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a·x - b|| subject to x >= 0, by Lawson and Hanson's active-set method (exact,
    polynomial in the columns; an enumeration of column subsets is 2^k)."""
    m, k = a.shape
    tol = 10 * np.finfo(np.float64).eps * np.abs(a).sum(axis=0).max() * max(m, k)
    passive = np.zeros(k, dtype=bool)  # columns free to be positive
    x = np.zeros(k)
    for _ in range(3 * k + 10):
        gradient = a.T @ (b - a @ x)
        candidates = np.where(~passive, gradient, -np.inf)
        if not np.any(~passive) or candidates.max() <= tol:
            break
        passive[int(np.argmax(candidates))] = True
        while True:
            z = np.zeros(k)
            z[passive], *_ = np.linalg.lstsq(a[:, passive], b, rcond=None)
            if np.all(z[passive] > tol):
                x = z
                break
            # step from x toward z until the first passive coefficient reaches 0, drop those
            blocking = passive & (z <= tol)
            alpha = np.min(x[blocking] / np.maximum(x[blocking] - z[blocking], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


def _fit_of(features: tuple[str, ...], coef: np.ndarray, x: np.ndarray, y: np.ndarray) -> Fit:
    pred = x @ coef
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((pred - y) ** 2)) / total if total > 0 else 1.0
    rel = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)
    return Fit(
        features,
        tuple(float(c) for c in coef),
        r2,
        float(rel.max()),
        float(rel.mean()),
        len(y),
    )


def prefill_features(lens: Sequence[int]) -> list[float]:
    """[1, tokens, Σlen², sequences] of one prefill batch (Σlen²: causal attention's cost)."""
    return [1.0, float(sum(lens)), float(sum(n * n for n in lens)), float(len(lens))]


def chunk_features(spans: Sequence[tuple[int, int]]) -> list[float]:
    """prefill_features of prompt chunks [start, end): a chunk's queries attend to every cached
    position before them, so its attention term is end² - start² (a whole prompt: len²)."""
    return [
        1.0,
        float(sum(e - s for s, e in spans)),
        float(sum(e * e - s * s for s, e in spans)),
        float(len(spans)),
    ]


KNOT = "batch="  # decode feature names "batch=1", "batch=2", ...: one base cost per knot


def decode_features(
    batch: int, context_sum: int, knots: Sequence[int] | None = None
) -> list[float]:
    """Features of one decode step (context: a seq's cached tokens + the new one): with
    `knots`, the batch's interpolation weights over them, then Σcontext; without, the linear
    form [1, batch, Σcontext]."""
    if knots is None:
        return [1.0, float(batch), float(context_sum)]
    return [*knot_weights(batch, knots), float(context_sum)]


def knot_weights(x: float, knots: Sequence[int]) -> list[float]:
    """Weights that interpolate linearly between the two knots around x (extrapolating from the
    last two above the largest; the smallest's value below it)."""
    w = [0.0] * len(knots)
    if len(knots) == 1 or x <= knots[0]:
        w[0] = 1.0
        return w
    i = len(knots) - 2
    for j in range(len(knots) - 1):
        if x <= knots[j + 1]:
            i = j
            break
    t = (x - knots[i]) / (knots[i + 1] - knots[i])
    w[i], w[i + 1] = 1.0 - t, t
    return w


def decode_knots(fit: Fit) -> list[int] | None:
    """The batch sizes a decode fit has a base cost for; None for the linear form."""
    knots = [int(f.removeprefix(KNOT)) for f in fit.features if f.startswith(KNOT)]
    return knots or None


def fit_prefill(samples: Sequence[tuple[Sequence[int], float]]) -> Fit:
    """samples: (prompt lengths of the batch, milliseconds)."""
    x = np.array([prefill_features(lens) for lens, _ in samples])
    return fit_nonnegative(PREFILL_FEATURES, x, np.array([ms for _, ms in samples]))


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> Fit:
    """samples: (batch size, Σcontext, milliseconds). A base cost per measured batch size plus
    a cost per context token; the linear form when only one batch size was measured."""
    knots = sorted({b for b, _, _ in samples})
    y = np.array([ms for *_, ms in samples])
    if len(knots) < 2:
        x = np.array([decode_features(b, c) for b, c, _ in samples])
        return fit_nonnegative(DECODE_FEATURES, x, y)
    x = np.array([decode_features(b, c, knots) for b, c, _ in samples])
    return fit_nonnegative([f"{KNOT}{k}" for k in knots] + ["context_sum"], x, y)


@dataclass(frozen=True)
class TransferModel:
    """A link: fixed latency per transfer (header, trailer, hand-offs) plus bytes at a rate."""

    latency_ms: float
    bandwidth_gbps: float  # 1e9 bytes/s
    fit: Fit | None = None  # the fit it came from, for its quality figures

    def ms(self, nbytes: float) -> float:
        return self.latency_ms + self.wire_ms(nbytes)

    def wire_ms(self, nbytes: float) -> float:
        """Time the bytes alone occupy the link."""
        return nbytes / (self.bandwidth_gbps * 1e6)

    @classmethod
    def fitted(cls, samples: Sequence[tuple[int, float]]) -> TransferModel:
        """samples: (bytes, milliseconds) of whole transfers."""
        x = np.array([[1.0, float(b)] for b, _ in samples])
        fit = fit_nonnegative(TRANSFER_FEATURES, x, np.array([ms for _, ms in samples]))
        per_byte_ms = fit.coefficient("bytes")
        if per_byte_ms <= 0:
            raise FitError("transfer time did not grow with the bytes: measure larger transfers")
        return cls(fit.coefficient("const"), 1.0 / (per_byte_ms * 1e6), fit)
