"""Latency-model fitting: least squares with non-negative coefficients recovers known models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pdserve.bench.plan.latency_model import (
    DECODE_FEATURES,
    Fit,
    FitError,
    TransferModel,
    decode_features,
    decode_knots,
    fit_decode,
    fit_nonnegative,
    fit_prefill,
    knot_weights,
    nnls,
    prefill_features,
)

PREFILL_TRUE = {"const": 4.0, "tokens": 0.5, "sum_len_sq": 2e-4, "seqs": 1.5}
DECODE_TRUE = {"const": 12.0, "batch": 0.8, "context_sum": 0.003}


def prefill_samples(noise: float = 0.0, seed: int = 0) -> list[tuple[list[int], float]]:
    rng = np.random.default_rng(seed)
    comps = [[n] * k for n in (16, 64, 256, 1024) for k in (1, 2, 4, 8) if n * k <= 4096]
    comps += [[8, 300, 40], [900, 17], [5] * 30]
    out = []
    for lens in comps:
        ms = float(np.dot(list(PREFILL_TRUE.values()), prefill_features(lens)))
        out.append((lens, ms * (1 + noise * rng.standard_normal())))
    return out


def test_prefill_fit_recovers_known_coefficients() -> None:
    fit = fit_prefill(prefill_samples())
    for name, value in PREFILL_TRUE.items():
        assert fit.coefficient(name) == pytest.approx(value, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.max_rel_err < 1e-9


def test_decode_fit_recovers_known_coefficients_under_noise() -> None:
    """Data linear in the batch: the knots land on the line and the context cost is found."""
    rng = np.random.default_rng(1)
    samples = []
    for b in (1, 2, 4, 8, 16, 32):
        for ctx in (32, 128, 512, 2048):
            ms = float(np.dot(list(DECODE_TRUE.values()), decode_features(b, b * ctx)))
            samples.append((b, b * ctx, ms * (1 + 0.01 * rng.standard_normal())))
    fit = fit_decode(samples)
    assert decode_knots(fit) == [1, 2, 4, 8, 16, 32]
    for b in (1, 2, 4, 8, 16, 32):
        assert fit.coefficient(f"batch={b}") == pytest.approx(12.0 + 0.8 * b, rel=0.05)
    assert fit.coefficient("context_sum") == pytest.approx(0.003, rel=0.05)
    assert fit.r2 > 0.99
    assert 0 < fit.max_rel_err < 0.05


def test_decode_fit_follows_a_step_in_the_batch_cost() -> None:
    """The CPU shape (measured: BLAS runs one row as a matrix-vector product, two or four at
    nearly twice the cost): the knots keep the step a single line through the origin smooths
    over, and interpolate between measured batch sizes."""
    base = {1: 18.0, 2: 32.0, 4: 33.0, 8: 36.0}
    samples = [(b, b * c, ms + 0.004 * b * c) for b, ms in base.items() for c in (64, 256, 1024)]
    fit = fit_decode(samples)
    knots = decode_knots(fit)
    for b, ms in base.items():
        x = decode_features(b, b * 256, knots)
        assert fit.predict(x) == pytest.approx(ms + 0.004 * b * 256, rel=1e-6)
    assert fit.predict(decode_features(3, 0, knots)) == pytest.approx(32.5)  # between 2 and 4
    assert fit.predict(decode_features(16, 0, knots)) == pytest.approx(42.0)  # 8 -> beyond
    linear = fit_nonnegative(
        DECODE_FEATURES, np.array([decode_features(b, c) for b, c, _ in samples]),
        np.array([ms for *_, ms in samples]),
    )  # fmt: skip
    assert linear.max_rel_err > 0.15 > fit.max_rel_err  # the old linear form misses the step


def test_knot_weights_interpolate_and_extrapolate() -> None:
    assert knot_weights(1, [1, 2, 4]) == [1.0, 0.0, 0.0]
    assert knot_weights(3, [1, 2, 4]) == [0.0, 0.5, 0.5]
    assert knot_weights(8, [1, 2, 4]) == [0.0, -2.0, 3.0]  # 4 + 2 x (4 - 2)
    assert knot_weights(5, [8]) == [1.0]


def test_coefficients_stay_non_negative() -> None:
    # y falls slightly with x2 in the data: plain least squares would give x2 a negative weight
    x = np.array([[1.0, t, t * 0.5 + (t % 3)] for t in range(1, 30)])
    y = 2.0 + 0.3 * x[:, 1] - 0.01 * x[:, 2]
    fit = fit_nonnegative(("const", "x1", "x2"), x, y)
    assert all(c >= 0 for c in fit.coef)
    assert fit.coefficient("x2") == 0.0
    assert fit.r2 > 0.99


def test_transfer_fit_gives_latency_and_bandwidth() -> None:
    # 2 ms fixed + 4 GB/s
    samples = [(b, 2.0 + b / 4e6) for b in (2**18, 2**20, 2**22, 2**24, 2**26)]
    link = TransferModel.fitted(samples)
    assert link.latency_ms == pytest.approx(2.0)
    assert link.bandwidth_gbps == pytest.approx(4.0)
    assert link.ms(4e9) == pytest.approx(1002.0)


def test_transfer_that_does_not_grow_with_bytes_is_refused() -> None:
    with pytest.raises(FitError, match="larger transfers"):
        TransferModel.fitted([(1, 3.0), (2, 3.0), (4, 3.0)])


def test_too_few_samples_say_so() -> None:
    with pytest.raises(FitError, match="2 samples cannot fit 4"):
        fit_prefill([([16], 1.0), ([32], 2.0)])


def test_fit_round_trips_through_json() -> None:
    fit = fit_prefill(prefill_samples(noise=0.02))
    again = Fit.from_json(fit.to_json())
    assert again == fit
    assert again.predict(prefill_features([100, 200])) == fit.predict(prefill_features([100, 200]))


def test_nnls_matches_the_best_non_negative_subset_fit() -> None:
    """Lawson-Hanson against brute force over column subsets, on random problems where some
    unconstrained coefficients come out negative."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        k = int(rng.integers(2, 6))
        a = rng.standard_normal((30, k)) * rng.uniform(0.1, 1e3, k)
        b = a @ rng.uniform(-1, 1, k) + 0.1 * rng.standard_normal(30)
        best = None
        for size in range(k + 1):
            for cols in itertools.combinations(range(k), size):
                x = np.zeros(k)
                if cols:
                    x[list(cols)], *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
                if np.all(x >= 0):
                    sse = float(np.sum((a @ x - b) ** 2))
                    best = sse if best is None else min(best, sse)
        x = nnls(a, b)
        assert np.all(x >= 0)
        assert float(np.sum((a @ x - b) ** 2)) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_many_decode_knots_fit_quickly() -> None:
    """33 features (32 batch sizes + context): exact NNLS, no 2^33 subset search."""
    samples = [
        (b, b * c, 10 + 2 * b + (b % 3) + 0.004 * b * c) for b in range(1, 33) for c in (128, 512)
    ]
    fit = fit_decode(samples)
    assert len(fit.features) == 33 and fit.max_rel_err < 1e-6
