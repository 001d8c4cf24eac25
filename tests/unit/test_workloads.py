"""Workload specs, length sampling, context clipping, token-id prompts and trace files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pdserve.bench.serve.prompts import prompt_token_ids
from pdserve.bench.serve.traces import TraceFormatError, load_trace
from pdserve.bench.serve.workloads import (
    SCALE_FLOOR,
    LogNormal,
    RequestShape,
    SyntheticWorkload,
    TraceWorkload,
    Uniform,
    WorkloadError,
    clip_to_context,
    parse_workload,
)

REPO = Path(__file__).resolve().parents[2]
# the shared trace sits beside the checkout (../shared), wherever the checkout is cloned
AZURE = (REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv").resolve()
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_fixed() -> None:
    w = parse_workload("fixed:in=256,out=64")
    assert w.sample(3, seed=0) == [RequestShape(256, 64)] * 3
    assert not w.replays_timestamps


def test_uniform_covers_the_inclusive_range() -> None:
    w = parse_workload("uniform:in=64-512,out=16-18")
    shapes = w.sample(2000, seed=0)
    ins, outs = [s.input_len for s in shapes], [s.output_len for s in shapes]
    assert (min(ins), max(ins)) == (64, 512)
    assert set(outs) == {16, 17, 18}
    assert w.sample(10, seed=1) == w.sample(10, seed=1) != w.sample(10, seed=2)


def test_lognormal_has_the_asked_mean() -> None:
    w = parse_workload("lognormal:in_mean=512,out_mean=128,out_sigma=1.0")
    assert w.input == LogNormal(512, 0.5)  # type: ignore[union-attr]
    shapes = w.sample(40_000, seed=0)
    assert np.mean([s.input_len for s in shapes]) == pytest.approx(512, rel=0.03)
    assert np.mean([s.output_len for s in shapes]) == pytest.approx(128, rel=0.05)


def test_chat_asks_for_text_with_lengths_of_either_kind() -> None:
    default = parse_workload("chat")
    assert isinstance(default, SyntheticWorkload) and default.text
    assert (default.input, default.output) == (LogNormal(256, 0.5), LogNormal(128, 0.5))
    tuned = parse_workload("chat:in_mean=512,out_sigma=1")
    assert (tuned.input, tuned.output) == (LogNormal(512, 0.5), LogNormal(128, 1.0))  # type: ignore[union-attr]
    ranged = parse_workload("chat:in=64-512,out=32")
    assert (ranged.input, ranged.output) == (Uniform(64, 512), Uniform(32, 32))  # type: ignore[union-attr]
    assert ranged.sample(5, seed=1) == ranged.sample(5, seed=1)
    assert not parse_workload("lognormal:in_mean=256,out_mean=128").text


def test_single_value_uniform_range() -> None:
    assert parse_workload("uniform:in=8,out=4-4").input == Uniform(8, 8)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("poisson:in=1", "unknown kind"),
        ("fixed", "unknown kind"),
        ("fixed:in=256", "missing out"),
        ("fixed:in=256,out=64,len=3", "unknown key 'len'"),
        ("fixed:in=0,out=64", "whole number >= 1"),
        ("fixed:in=2.5,out=64", "whole number >= 1"),
        ("fixed:in256,out=64", "not KEY=VALUE"),
        ("uniform:in=512-64,out=1", "LOW <= HIGH"),
        ("lognormal:in_mean=512,out_mean=-3", "number > 0"),
        ("trace:", "give the trace's path"),
        ("trace:x.csv,speedup=2,timestamps=false", "drop speedup"),
        ("trace:x.csv,timestamps=maybe", "true or false"),
        ("chat:in=64", "missing out"),
        ("chat:in=64,out=8,in_mean=3", "unknown key 'in_mean'"),
        ("chat:in_mean=0", "number > 0"),
    ],
)
def test_bad_specs_say_what_to_write(spec: str, says: str) -> None:
    with pytest.raises(WorkloadError, match=says):
        parse_workload(spec)


def test_clip_to_context_cuts_prompt_then_output() -> None:
    shapes = [RequestShape(100, 50), RequestShape(5000, 20), RequestShape(0, 0)]
    assert clip_to_context(shapes, 128) == [
        RequestShape(100, 28),
        RequestShape(127, 1),
        RequestShape(1, 1),
    ]
    assert clip_to_context(shapes, None)[1] == RequestShape(5000, 20)
    with pytest.raises(WorkloadError, match="too short"):
        clip_to_context(shapes, 1)


def test_prompt_token_ids_exact_lengths_in_range() -> None:
    prompts = prompt_token_ids([3, 0, 50], seed=4, id_range=(16, 20))
    assert [len(p) for p in prompts] == [3, 0, 50]
    assert all(16 <= t < 20 and isinstance(t, int) for p in prompts for t in p)
    assert prompt_token_ids([50], 4, (16, 512)) == prompt_token_ids([50], 4, (16, 512))
    with pytest.raises(ValueError, match="LOW < HIGH"):
        prompt_token_ids([1], 0, (10, 10))


def test_small_trace_replay(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "10.0,100,5\n10.5,200,6\n\n12.0,300,7\n")
    w = parse_workload(f"trace:{path},speedup=2")
    assert isinstance(w, TraceWorkload)
    assert w.sample(2, seed=0) == [RequestShape(100, 5), RequestShape(200, 6)]
    assert w.arrival_times(3) == [0.0, 0.25, 1.0]
    with pytest.raises(WorkloadError, match="at most 3"):
        w.sample(4, seed=0)


def test_trace_lengths_only_draws_rows(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "0,100,5\n1,200,6\n2,300,7\n")
    w = parse_workload(f"trace:{path},timestamps=false")
    assert not w.replays_timestamps
    shapes = w.sample(300, seed=0)  # more than the rows: drawn with replacement
    assert set(shapes) == {RequestShape(100, 5), RequestShape(200, 6), RequestShape(300, 7)}


def test_trace_scale_moves_lengths_toward_the_floor(tmp_path: Path) -> None:
    assert SCALE_FLOOR == 16
    path = write(tmp_path, HEADER + "0,100,5\n1,201,40\n")
    w = parse_workload(f"trace:{path},speedup=1,scale=0.25")
    # 100 -> 16 + 84/4 = 37, 5 stays (at most the floor), 201 -> 62.25 -> 62, 40 -> 22
    assert w.sample(2, seed=0) == [RequestShape(37, 5), RequestShape(62, 22)]
    lengths_only = parse_workload(f"trace:{path},timestamps=false,scale=2")
    assert set(lengths_only.sample(50, seed=0)) == {RequestShape(184, 5), RequestShape(386, 64)}
    with pytest.raises(WorkloadError, match="scale=0 must be a number > 0"):
        parse_workload(f"trace:{path},scale=0")


def test_trace_datetime_stamps_and_extra_columns(tmp_path: Path) -> None:
    text = (
        "GeneratedTokens,TIMESTAMP,ContextTokens,Note\n"
        "44,2023-11-16 18:15:46.6805900,374,a\n"
        "109,2023-11-16 18:15:50.9951690,396,b\n"
    )
    rows = load_trace(write(tmp_path, text))
    assert [(r.input_len, r.output_len) for r in rows] == [(374, 44), (396, 109)]
    assert rows[1].timestamp_s - rows[0].timestamp_s == pytest.approx(4.314579, abs=1e-6)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "line 1: header"),
        ("time,in,out\n0,1,1\n", "line 1: header"),
        (HEADER, "no rows"),
        (HEADER + "0,10,5\n1,10\n", "line 3: '1,10' has 2 fields"),
        (HEADER + "0,10,5\n1,10,5\n2,abc,5\n", "line 4: ContextTokens 'abc'"),
        (HEADER + "0,10,-5\n", "line 2: GeneratedTokens '-5' is not a whole number"),
        (HEADER + "yesterday,10,5\n", "line 2: TIMESTAMP 'yesterday'"),
        (HEADER + "5,10,5\n3,10,5\n", "line 3: TIMESTAMP goes back in time.*sort"),
    ],
)
def test_malformed_trace_names_the_line(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(TraceFormatError, match=says):
        load_trace(write(tmp_path, text))


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="not found"):
        parse_workload(f"trace:{tmp_path / 'nope.csv'}")


@pytest.mark.skipif(not AZURE.is_file(), reason="the shared Azure trace is not on this machine")
def test_azure_conversation_trace() -> None:
    w = parse_workload(f"trace:{AZURE}")
    assert isinstance(w, TraceWorkload)
    assert len(w.rows) == 19_366
    # the trace's README: context median 1020, generated median 129
    assert np.median([r.input_len for r in w.rows]) == 1020
    assert np.median([r.output_len for r in w.rows]) == 129
    arrivals = w.arrival_times(1000)
    assert arrivals[0] == 0.0
    assert 1000 / arrivals[-1] == pytest.approx(4.6, rel=0.05)  # about 4.6 req/s at 1x
    assert w.sample(2, seed=0) == [RequestShape(374, 44), RequestShape(396, 109)]
    clipped = clip_to_context(w.sample(1000, seed=0), 2048)
    assert max(s.input_len + s.output_len for s in clipped) <= 2048


@pytest.mark.skipif(not AZURE.is_file(), reason="the shared Azure trace is not on this machine")
def test_a_tenth_of_the_azure_trace_keeps_real_outputs() -> None:
    """scale=0.1 once made every output under 15 tokens a 1-token output (0.9% of this trace,
    55% at scale=0.01); now none is, and the lengths keep their order and spread."""
    w = parse_workload(f"trace:{AZURE},timestamps=false,scale=0.1")
    shapes = w.sample(5000, seed=0)
    outs = np.array([s.output_len for s in shapes])
    assert np.mean(outs == 1) < 0.001
    assert np.mean(outs < 8) < 0.01  # the trace's shortest output is 7 tokens
    original = np.array([r.output_len for r in w.rows])  # type: ignore[union-attr]
    scaled_median = np.median([s.output_len for s in w.sample(len(original), seed=1)])
    assert scaled_median == pytest.approx(16 + (np.median(original) - 16) * 0.1, abs=3)
    tiny = parse_workload(f"trace:{AZURE},timestamps=false,scale=0.01").sample(5000, seed=0)
    assert np.mean([s.output_len == 1 for s in tiny]) < 0.001
