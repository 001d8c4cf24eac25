"""The deploy spec: shipped YAMLs load and resolve; bad specs name the key and what to write."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve.cluster.config.resolve import read_api_key, resolve, settle
from pdserve.cluster.config.schema import parse_memory
from pdserve.cluster.config.spec import (
    LOCAL_SPEC_YAML,
    DeploySpec,
    SpecError,
    default_spec_path,
    load_spec,
    with_ray_address,
    write_embedded_spec,
)
from pdserve.engine.deploy_config import KVCacheSize, PrefillSettings, RouterSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GPU_SPEC = DEPLOY / "gpu-8x.yaml"


@pytest.fixture(autouse=True)
def cache_dir(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A private cache dir whose built-in tiny-llama is the session's prebuilt one."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    (tmp_path / "tiny-llama-s0").symlink_to(tiny_models["llama"], target_is_directory=True)
    yield tmp_path


def spec_dict(**sections: Any) -> dict[str, Any]:
    """A minimal valid spec (the built-in model on CPU) with `sections` merged in."""
    base: dict[str, Any] = {"name": "t", "model": {"device": "cpu"}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


S = spec_dict


def spec_error(source: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(source)
    return info.value


def problems_of(data: Any) -> list[str]:
    return spec_error(data).problems


def resolve_problems(data: dict[str, Any], gpus: bool = False) -> list[str]:
    with pytest.raises(SpecError) as info:
        resolve(load_spec(data), gpus_available=gpus)
    return info.value.problems


# --- the shipped specs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["local.yaml", "local-tp2.yaml"])
def test_local_specs_resolve_to_cpu_clusters_on_the_builtin_model(name: str) -> None:
    resolved = resolve(load_spec(DEPLOY / name), gpus_available=False)
    assert resolved.model.device == "cpu"
    assert (Path(resolved.model.path) / "config.json").is_file()
    assert resolved.server.served_model_name == "tiny-llama"
    assert resolved.namespace == f"pdserve-{resolved.name}"
    assert resolved.link_prefix == resolved.namespace
    assert resolved.server.host == "127.0.0.1"
    assert resolved.decode.kv_cache.memory_fraction is None


def test_local_tp2_has_tp2_prefill_and_two_decode_replicas_beside_local() -> None:
    local = resolve(load_spec(DEPLOY / "local.yaml"), gpus_available=False)
    tp2 = resolve(load_spec(DEPLOY / "local-tp2.yaml"), gpus_available=False)
    assert (local.prefill_tp, local.decode.instances) == (1, 1)
    assert (tp2.prefill_tp, tp2.decode.instances) == (2, 2)
    # Both can run on one Ray cluster and one machine.
    assert local.namespace != tp2.namespace
    assert local.server.port != tp2.server.port
    assert local.server.jobs_dir != tp2.server.jobs_dir


def test_gpu_spec_resolves_without_its_model_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "sk-test")
    with caplog.at_level(logging.WARNING):
        resolved = resolve(load_spec(GPU_SPEC), gpus_available=True)
    assert "does not exist on this machine" in caplog.text
    c = resolved
    assert c.model.device == "cuda" and c.kv_backend == "nccl"
    assert (c.prefill_instances, c.prefill_tp, c.decode.instances) == (2, 2, 4)
    assert c.num_actors == 8
    assert c.prefill is not None and c.prefill.resources == {"prefill": 1}
    assert c.decode.resources == {"decode": 1}
    assert c.decode.kv_cache == KVCacheSize(memory_fraction=0.9)
    assert resolved.server.api_key == "sk-test"
    assert resolved.ray_address == "auto"


def test_gpu_spec_on_a_cluster_without_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_API_KEY", "sk-test")
    with pytest.raises(SpecError) as info:
        resolve(load_spec(GPU_SPEC), gpus_available=False)
    assert info.value.problems == [
        "model.device: cuda, but the Ray cluster has no GPUs; write cpu or auto"
    ]


def test_default_spec_is_the_embedded_local_yaml(tmp_path: Path) -> None:
    assert (DEPLOY / "local.yaml").read_text() == LOCAL_SPEC_YAML
    assert default_spec_path() == DEPLOY / "local.yaml"
    written = write_embedded_spec(tmp_path / "x" / "local.yaml")
    assert load_spec(written) == load_spec(DEPLOY / "local.yaml")


def _start_resources(command: list[str]) -> dict[str, float]:
    match = re.search(r"--resources='([^']*)'", " ".join(command))
    return json.loads(match.group(1)) if match else {}


def test_ray_launcher_yamls_pass_rays_schema_and_fit_the_gpu_spec() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    spec = load_spec(GPU_SPEC)
    need = {
        "prefill": spec.prefill_pool.instances * spec.prefill_pool.tensor_parallel_size,
        "decode": spec.decode.instances,
    }
    for name in ("onprem.yaml", "aws.yaml"):
        config = yaml.safe_load((DEPLOY / "ray" / name).read_text())
        validate_config(prepare_config(copy.deepcopy(config)))
        if config["provider"]["type"] == "local":
            head = _start_resources(config["head_start_ray_commands"])
            worker = _start_resources(config["worker_start_ray_commands"])
            workers = len(config["provider"]["worker_ips"])
            offered = {k: head.get(k, 0) + workers * worker.get(k, 0) for k in need}
        else:
            types = config["available_node_types"].values()
            offered = {
                k: sum(t["resources"].get(k, 0) * t.get("min_workers", 1) for t in types)
                for k in need
            }
        assert offered == need, name


# --- unknown keys and bad values --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "hint"),
    [
        (S(decode={"max_num_seq": 8}), "decode.max_num_seq", "did you mean 'max_num_seqs'?"),
        (S(prefil={"instances": 2}), "prefil", "did you mean 'prefill'?"),
        (S(decode={"tensor_parallel_size": 2}), "decode.tensor_parallel_size", "under prefill"),
        (S(decode={"kv_cache": {"block": 4}}), "decode.kv_cache.block", "did you mean 'blocks'?"),
        (
            S(decode={"enable_chunked_prefill": True}),
            "decode.enable_chunked_prefill",
            "'chunked_prefill'",
        ),
        (S(zzz=1), "zzz", "valid keys here: name, mode, model"),
    ],
)
def test_unknown_keys_are_rejected_with_a_suggestion(
    data: dict[str, Any], path: str, hint: str
) -> None:
    problems = problems_of(data)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: unknown key; "), problems
    assert hint in problems[0]


@pytest.mark.parametrize(
    ("data", "path", "hint"),
    [
        ({"model": {"device": "cpu"}}, "name", "add it"),
        (S(name="My_Model"), "name", "a-z, 0-9"),
        (S(mode="colocate"), "mode", "'colocated'"),
        (S(model={"dtype": "bf16"}), "model.dtype", "'bfloat16'"),
        (S(model={"device": "gpu"}), "model.device", "'cuda'"),
        (S(model={"path": "builtin:tiny-lama"}), "model.path", "builtin:tiny-llama"),
        (S(model={"max_model_len": 0}), "model.max_model_len", "auto or a positive"),
        (S(prefill={"tensor_parallel_size": 3}), "prefill.tensor_parallel_size", "power of two"),
        (S(prefill={"instances": 0}), "prefill.instances", "must be >= 1, got 0"),
        (S(prefill={"resources": {"GPU": 1}}), "prefill.resources", "custom resources only"),
        (S(decode={"instances": "2"}), "decode.instances", "without quotes"),
        (S(decode={"kv_cache": 4096}), "decode.kv_cache", "{blocks: 4096}"),
        (S(decode={"kv_cache": "lots"}), "decode.kv_cache", "auto or a section"),
        (S(decode={"kv_cache": {"memory": "2 gigs"}}), "decode.kv_cache.memory", '"2GiB"'),
        (S(decode={"kv_cache": {"blocks": 8, "memory": "1GiB"}}), "decode.kv_cache", "one of"),
        (S(decode={"kv_cache": {"memory_fraction": 1.5}}), "decode.kv_cache.memory_fraction", "<= 1"),
        (S(decode=3), "decode", "a section with keys instances"),
        (S(kv_transfer={"backend": "mpi"}), "kv_transfer.backend", "auto, nccl, gloo"),
        (S(router={"prefill_policy": "least_load"}), "router.prefill_policy", "'least_loaded'"),
        (S(router={"decode_policy": "random"}), "router.decode_policy", "most_free_blocks"),
        (S(server={"port": 70000}), "server.port", "must be <= 65535"),
        (S(server={"api_key": "env:1X"}), "server.api_key", "variable name"),
        (S(ray={"address": "somewhere"}), "ray.address", "host:port"),
        (S(mode="colocated", prefill={"instances": 1}), "prefill", "remove the section"),
        (S(decode={"chunked_prefill": True}), "decode.chunked_prefill", "only applies in colocated"),
        (S(decode={"max_num_batched_tokens": 512}), "decode.max_num_batched_tokens", "write mode: colocated"),
        (S(mode="colocated", decode={"chunked_prefill": "yes"}), "decode.chunked_prefill", "boolean"),
        (S(mode="colocated", decode={"max_num_batched_tokens": 0}), "decode.max_num_batched_tokens", "auto or a positive"),
        (S(mode="colocated", decode={"chunked_prefill": True, "max_num_batched_tokens": 32}),
         "decode.max_num_batched_tokens", "at least max_num_seqs (64) with chunked prefill, got 32"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key_and_the_fix(data: dict[str, Any], path: str, hint: str) -> None:
    problems = problems_of(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: ") and hint in problems[0], problems[0]


def test_every_problem_is_reported_at_once() -> None:
    data = S(prefill={"instances": 0}, decode={"block_size": 0}, server={"port": 0})
    error = spec_error(data)
    assert len(error.problems) == 3
    assert str(error).count("\n") == 3  # a header line, then one line per problem


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("name: a\nname: b\n", "key 'name' appears twice"),
        ("name: a\n  model: [\n", "not valid YAML: line 2"),
        ("", "top level must be a mapping"),
    ],
)
def test_broken_yaml_files_are_reported_with_the_file(tmp_path: Path, text: str, hint: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    error = spec_error(path)
    assert str(error).startswith(str(path)) and hint in str(error)


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    error = spec_error(str(tmp_path / "nope.yaml"))
    assert "no such file" in str(error)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000), (4096, 4096)],
)
def test_memory_sizes(text: str | int, size: int) -> None:
    assert parse_memory(text) == size
    spec = load_spec(S(decode={"kv_cache": {"memory": text}}))
    assert resolve(spec, gpus_available=False).decode.kv_cache == KVCacheSize(memory_bytes=size)


# --- resolving --------------------------------------------------------------------------------


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


def test_address_override_is_validated_and_keeps_the_rest() -> None:
    spec = load_spec(DEPLOY / "local-tp2.yaml")
    moved = with_ray_address(spec, "10.0.0.1:6379")
    assert moved.ray.address == "10.0.0.1:6379"
    assert moved.model_copy(update={"ray": spec.ray}) == spec
    with pytest.raises(SpecError, match=r"ray\.address"):
        with_ray_address(spec, "nowhere")


def test_spec_is_frozen_and_errors_survive_pickling() -> None:
    spec: DeploySpec = load_spec(DEPLOY / "local.yaml")
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "other"  # type: ignore[misc]
    error = SpecError(["a.b: bad", "c: worse"], "x.yaml")
    assert pickle.loads(pickle.dumps(error)).problems == error.problems


def test_every_written_knob_reaches_the_resolved_tree() -> None:
    spec = load_spec(
        S(
            prefill={"instances": 3, "tensor_parallel_size": 2, "max_batch_tokens": 100,
                     "max_batch_size": 5, "resources": {"p": 1}},
            decode={"instances": 2, "max_num_seqs": 7, "block_size": 8, "resources": {"d": 1}},
            router={"prefill_policy": "round_robin", "decode_policy": "fewest_running",
                    "max_queued_requests": 9},
            server={"host": "127.0.0.2", "port": 9999, "max_request_bytes": 4096},
            ray={"num_threads_per_cpu_worker": 3},
            kv_transfer={"backend": "gloo"},
        )
    )  # fmt: skip
    c = settle(spec, "cpu")
    assert c.prefill == PrefillSettings(3, 2, 100, 5, {"p": 1.0})
    assert (c.decode.instances, c.decode.max_num_seqs, c.decode.block_size) == (2, 7, 8)
    assert c.decode.resources == {"d": 1.0}
    assert c.router == RouterSettings("round_robin", "fewest_running", 9)
    assert (c.server.host, c.server.port, c.server.max_request_bytes) == ("127.0.0.2", 9999, 4096)
    assert (c.model.num_threads, c.kv_backend) == (3, "gloo")
