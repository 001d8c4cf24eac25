"""Workloads whose prompts share prefixes: shared-prefix groups and multi-turn conversations,
their specs, shapes, arrivals, and the text the bench sends for them (history included)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pdserve.bench.serve.arrivals import request_arrivals
from pdserve.bench.serve.conversation import chat_messages, completion_prompt
from pdserve.bench.serve.load import PlannedRequest
from pdserve.bench.serve.prompts import TextPrompts
from pdserve.bench.serve.reuse_workloads import MultiTurnWorkload, SharedPrefixWorkload
from pdserve.bench.serve.runner import CHAT, BenchConfig, plan_requests
from pdserve.bench.serve.tokens import TextTokens, find_tokens
from pdserve.bench.serve.workloads import (
    RequestShape,
    Uniform,
    WorkloadError,
    clip_to_context,
    parse_workload,
)
from pdserve.engine.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tok") / "llama", "llama")


def test_specs_take_defaults_and_reject_unknown_keys() -> None:
    shared = parse_workload("shared-prefix")
    assert isinstance(shared, SharedPrefixWorkload) and shared.text
    assert (shared.groups, shared.system, shared.question) == (4, 512, Uniform(64, 64))
    turns = parse_workload("multi-turn:turns=6,system=1024,in=32-64,out=16,conversations=3")
    assert isinstance(turns, MultiTurnWorkload)
    assert (turns.turns, turns.system, turns.message, turns.conversations) == (
        6, 1024, Uniform(32, 64), 3,
    )  # fmt: skip
    assert parse_workload("multi-turn:system=0").system == 0  # type: ignore[union-attr]
    with pytest.raises(WorkloadError, match="unknown key 'turn'"):
        parse_workload("multi-turn:turn=3")
    with pytest.raises(WorkloadError, match="groups=0 must be a whole number"):
        parse_workload("shared-prefix:groups=0")


def test_shared_prefix_groups_are_even_and_interleaved() -> None:
    w = parse_workload("shared-prefix:groups=3,system=100,in=10-20,out=5")
    shapes = w.sample(30, seed=0)
    assert Counter(s.group for s in shapes) == {0: 10, 1: 10, 2: 10}
    assert [s.group for s in shapes[:10]] != sorted(s.group for s in shapes[:10])
    assert all(s.shared_len == 100 and 110 <= s.input_len <= 120 for s in shapes)
    assert all(s.follows is None and s.reuses for s in shapes)


def test_multi_turn_shapes_chain_history_and_answers() -> None:
    w = parse_workload("multi-turn:turns=3,system=50,in=10,out=4")
    shapes = w.sample(7, seed=0)  # ceil(7 / 3) = 3 conversations of 3, 2, 2 turns
    follows = [s.follows for s in shapes]
    assert follows == [None, 0, 1, None, 3, None, 5]
    assert [s.input_len for s in shapes[:3]] == [60, 74, 88]  # + previous prompt, answer, 10
    assert all(s.shared_len == 50 and s.group == 0 for s in shapes)
    with pytest.raises(WorkloadError, match="hold 4 requests"):
        parse_workload("multi-turn:turns=2,conversations=2").sample(5, seed=0)


def test_reuse_shapes_are_never_cut_to_the_context() -> None:
    shapes = parse_workload("multi-turn:turns=4,system=50,in=10,out=10").sample(4, seed=0)
    assert clip_to_context(shapes, 4096) == clip_to_context(shapes, None) == shapes
    with pytest.raises(WorkloadError, match="exceeds the model's context of 100"):
        clip_to_context(shapes, 100)
    plain = [RequestShape(500, 10)]
    assert clip_to_context(plain, 100) == [RequestShape(99, 1)]


def test_only_first_turns_follow_the_rate() -> None:
    follows = [None, 0, 1, None, 3, 4]
    times = request_arrivals(follows, rate=2.0, seed=0)
    assert times[1] == times[2] == times[4] == times[5] == 0.0  # sent by the load generator
    assert 0 < times[0] < times[3]
    # two openers of six requests: they come at a third of the rate, so the mean gap is 1.5 s
    many = request_arrivals([None, 0, 1] * 2000, rate=2.0, seed=1)
    openers = [t for i, t in enumerate(many) if i % 3 == 0]
    assert openers[-1] / len(openers) == pytest.approx(1.5, rel=0.05)


def test_completion_turns_extend_the_previous_prompt_and_answer() -> None:
    first = PlannedRequest(0, 0.0, "Tell me a story.", 8, system="SYSTEM PROMPT")
    second = PlannedRequest(1, 0.0, "Go on.", 8, system="SYSTEM PROMPT", follows=0)
    p1 = completion_prompt(first, [])
    p2 = completion_prompt(second, [("Tell me a story.", " Once upon a time")])
    assert p1 == "SYSTEM PROMPT\n\nUser: Tell me a story.\nAssistant:"
    assert p2.startswith(p1 + " Once upon a time")  # the server sees the same leading text
    assert p2.endswith("User: Go on.\nAssistant:")
    assert completion_prompt(PlannedRequest(2, 0.0, [5, 6], 1), []) == [5, 6]  # plain: as is


def test_chat_turns_carry_system_history_and_the_new_message() -> None:
    req = PlannedRequest(1, 0.0, "Go on.", 8, system="Be brief.", follows=0)
    messages = chat_messages(req, [("Hi", "Hello!")])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in messages] == ["Be brief.", "Hi", "Hello!", "Go on."]
    assert chat_messages(PlannedRequest(0, 0.0, "Hi", 1), []) == [{"role": "user", "content": "Hi"}]


def test_planned_requests_share_one_system_prompt_per_group(tiny_dir: Path) -> None:
    tokens = find_tokens(str(tiny_dir), "tiny", chat=False)
    config = BenchConfig(workload="shared-prefix:groups=2,system=200,in=30,out=4", num_prompts=8)
    planned = plan_requests(config, parse_workload(config.workload), tokens)  # type: ignore[arg-type]
    systems = {r.system for r in planned}
    assert len(systems) == 2 and "" not in systems
    for system in systems:  # real prose of about the asked length in the model's tokens
        assert 180 <= tokens.count(system) <= 200
    assert all(isinstance(r.prompt, str) and 20 <= tokens.count(r.prompt) <= 30 for r in planned)
    assert len({r.prompt for r in planned}) == 8  # each its own question
    assert planned == plan_requests(config, parse_workload(config.workload), tokens)  # type: ignore[arg-type]


def test_planned_turns_wait_for_their_answers(tiny_dir: Path) -> None:
    tokens = find_tokens(str(tiny_dir), "tiny", chat=True)
    workload = parse_workload("multi-turn:turns=3,system=64,in=16,out=8")
    config = BenchConfig(workload=workload, num_prompts=6, request_rate=5.0, endpoint=CHAT)
    planned = plan_requests(config, workload, tokens)
    assert [r.follows for r in planned] == [None, 0, 1, None, 3, 4]
    assert len({r.system for r in planned}) == 1  # one application's system prompt
    assert [r.text_tokens for r in planned] == [80, 104, 128] * 2  # as the shapes plan them
    assert planned[3].arrival_s > planned[0].arrival_s and planned[1].arrival_s == 0.0


def test_messages_are_counted_without_the_servers_template() -> None:
    texts = TextPrompts(TextTokens(overhead=50))  # the words estimate, a long template
    (whole,) = texts.make([100], seed=0)
    (piece,) = texts.make([100], seed=0, whole=False)
    assert whole.tokens <= 100 and piece.tokens <= 100
    assert TextTokens().count(piece.text) > TextTokens().count(whole.text) + 40
