"""Resolving deploy specs: every ``auto`` settled for the cluster at hand, the model checked,
the KV cache sized by one rule, every written knob carried into the frozen tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _spec_helpers import S, cache_dir, resolve_problems  # noqa: F401  (cache_dir: autouse)

from pdserve.cluster.config.resolve import read_api_key, resolve, settle
from pdserve.cluster.config.spec import SpecError, load_spec
from pdserve.engine.deploy_config import KVCacheSize, PrefillSettings, RouterSettings


def test_device_auto_follows_the_cluster() -> None:
    spec = load_spec(S(model={"device": "auto"}))
    assert resolve(spec, gpus_available=True).model.device == "cuda"
    assert resolve(spec, gpus_available=False).model.device == "cpu"
    assert resolve_problems(S(model={"device": "cuda"}))[0].startswith("model.device: ")


def test_kv_cache_sizes_reach_the_resolved_config() -> None:
    blocks = resolve(load_spec(S(decode={"kv_cache": {"blocks": 77}})), gpus_available=False)
    assert blocks.decode.kv_cache == KVCacheSize(blocks=77)
    auto = resolve(load_spec(S(decode={"kv_cache": "auto"})), gpus_available=False)
    assert auto.decode.kv_cache == KVCacheSize(memory_bytes=512 << 20)
    frac = S(decode={"kv_cache": {"memory_fraction": 0.5}}, model={"device": "auto"})
    on_gpu = resolve(load_spec(frac), gpus_available=True).decode.kv_cache
    assert on_gpu == KVCacheSize(memory_fraction=0.5)
    assert resolve_problems(frac)[0].startswith("decode.kv_cache.memory_fraction: ")


def test_the_kv_sizing_rule() -> None:
    assert KVCacheSize(blocks=7).num_blocks(1000) == 7
    assert KVCacheSize(memory_bytes=10_500).num_blocks(1000) == 10
    half = KVCacheSize(memory_fraction=0.5)
    # 100 GB device, 20 GB used by the weights: 30 GB left of the half, 90% of it for KV
    assert half.num_blocks(10**9, device_memory=(80 * 10**9, 100 * 10**9)) == 27
    with pytest.raises(ValueError, match="leaves no room"):
        half.num_blocks(10**9, device_memory=(40 * 10**9, 100 * 10**9))
    with pytest.raises(ValueError, match="exactly one"):
        KVCacheSize(blocks=1, memory_bytes=2)


def test_model_dependent_checks_name_the_key(tmp_path: Path) -> None:
    # The tiny llama has 4 attention heads, 2 KV heads and 2048 positions.
    tp8 = resolve_problems(S(prefill={"tensor_parallel_size": 8}))
    assert tp8[0].startswith("prefill.tensor_parallel_size: ") and "4 attention heads" in tp8[0]
    long = resolve_problems(S(model={"max_model_len": 4096}))
    assert long[0].startswith("model.max_model_len: ") and "2048" in long[0]
    (tmp_path / "empty").mkdir()
    bad = resolve_problems(S(model={"path": str(tmp_path / "empty")}))
    assert bad[0].startswith("model.path: ") and "config.json" in bad[0]


def test_local_model_dir_sets_the_served_name(tiny_models: dict[str, Path]) -> None:
    spec = load_spec(S(model={"path": str(tiny_models["qwen2"]), "max_model_len": 512}))
    resolved = resolve(spec, gpus_available=False)
    assert resolved.server.served_model_name == tiny_models["qwen2"].name
    assert resolved.model.max_model_len == 512
    named = S(model={"path": str(tiny_models["qwen2"]), "served_name": "q"})
    assert resolve(load_spec(named), gpus_available=False).server.served_model_name == "q"


def test_api_key_from_the_environment() -> None:
    assert read_api_key("literal-key", environ={}) == "literal-key"
    assert read_api_key("env:MY_KEY", environ={"MY_KEY": "s3cret"}) == "s3cret"
    assert read_api_key(None, environ={}) is None
    spec = load_spec(S(server={"api_key": "env:MY_KEY"}))
    assert resolve(spec, gpus_available=False, environ={"MY_KEY": "k"}).server.api_key == "k"
    with pytest.raises(SpecError, match=r"server.api_key: environment variable MY_KEY is not set"):
        resolve(spec, gpus_available=False, environ={})


def test_colocated_mode_has_no_prefill_pool() -> None:
    spec = load_spec(S(mode="colocated", decode={"instances": 3}))
    assert spec.prefill is None
    resolved = resolve(spec, gpus_available=False)
    assert resolved.mode == "colocated" and resolved.prefill is None
    assert (resolved.prefill_instances, resolved.decode.instances) == (0, 3)


@pytest.mark.parametrize(
    ("decode", "chunked", "budget"),
    [
        ({}, False, 8192),  # prefill priority: whole prompts, up to 8192 tokens a step
        ({"max_num_batched_tokens": 1024}, False, 1024),
        ({"chunked_prefill": True}, True, 2048),  # vLLM's default with chunked prefill
        ({"chunked_prefill": True, "max_num_seqs": 4096}, True, 4096),  # decodes always fit
        ({"chunked_prefill": True, "max_num_batched_tokens": 512}, True, 512),
    ],
)
def test_colocated_step_budget_reaches_the_resolved_config(
    decode: dict[str, Any], chunked: bool, budget: int
) -> None:
    d = resolve(load_spec(S(mode="colocated", decode=decode)), gpus_available=False).decode
    assert (d.chunked_prefill, d.max_num_batched_tokens) == (chunked, budget)


def test_every_written_knob_reaches_the_resolved_tree() -> None:
    spec = load_spec(
        S(
            prefill={"instances": 3, "tensor_parallel_size": 2, "max_batch_tokens": 100,
                     "max_batch_size": 5, "resources": {"p": 1}, "kv_cache": {"blocks": 40},
                     "chunked_prefill": True},
            decode={"instances": 2, "max_num_seqs": 7, "block_size": 8, "resources": {"d": 1}},
            router={"prefill_policy": "round_robin", "decode_policy": "fewest_running",
                    "max_queued_requests": 9},
            server={"host": "127.0.0.2", "port": 9999, "max_request_bytes": 4096},
            ray={"num_threads_per_cpu_worker": 3},
            kv_transfer={"backend": "gloo"},
        )
    )  # fmt: skip
    c = settle(spec, "cpu")
    assert c.prefill == PrefillSettings(
        3, 2, 100, 5, KVCacheSize(blocks=40), chunked_prefill=True, resources={"p": 1.0}
    )
    assert (c.decode.instances, c.decode.max_num_seqs, c.decode.block_size) == (2, 7, 8)
    assert c.decode.resources == {"d": 1.0}
    assert c.router == RouterSettings("round_robin", "fewest_running", 9)
    assert (c.server.host, c.server.port, c.server.max_request_bytes) == ("127.0.0.2", 9999, 4096)
    assert (c.model.num_threads, c.kv_backend) == (3, "gloo")
