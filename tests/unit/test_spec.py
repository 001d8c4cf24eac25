"""The deploy spec: shipped YAMLs load and resolve; bad specs name the key and what to write."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from _spec_helpers import (  # noqa: F401
    DEPLOY,
    GPU_SPEC,
    REPO,
    S,
    cache_dir,
    problems_of,
    resolve_problems,
    spec_error,
)

from pdserve.cluster.config.fields import parse_memory
from pdserve.cluster.config.resolve import resolve, settle
from pdserve.cluster.config.spec import (
    LOCAL_SPEC_YAML,
    DeploySpec,
    SpecError,
    default_spec_path,
    load_spec,
    with_ray_address,
    write_embedded_spec,
)
from pdserve.engine.deploy_config import KVCacheSize

# --- the shipped specs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["local.yaml", "local-tp3.yaml"])
def test_local_specs_settle_to_cpu_clusters_on_the_default_model(name: str) -> None:
    resolved = settle(
        load_spec(DEPLOY / name), "cpu"
    )  # the model itself: tests/integration/test_gguf_serving.py
    assert resolved.model.path == "builtin:smollm2-135m-instruct"
    assert resolved.server.served_model_name == "smollm2-135m-instruct"
    assert resolved.namespace == f"pdserve-{resolved.name}"
    assert resolved.link_prefix == resolved.namespace
    assert resolved.server.host == "127.0.0.1"
    assert resolved.decode.kv_cache.memory_fraction is None


def test_local_tp3_has_tp3_prefill_and_two_decode_replicas_beside_local() -> None:
    local = settle(load_spec(DEPLOY / "local.yaml"), "cpu")
    tp2 = settle(load_spec(DEPLOY / "local-tp3.yaml"), "cpu")
    assert (local.prefill_tp, local.decode.instances) == (1, 1)
    assert (tp2.prefill_tp, tp2.decode.instances) == (3, 2)
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
        (S(zzz=1), "zzz", "valid keys here: name, mode, prefix_caching, model"),
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
        (S(prefill={"tensor_parallel_size": 0}), "prefill.tensor_parallel_size", ">= 1"),
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
        (S(prefill={"chunked_prefill": True, "max_batch_tokens": 8}), "prefill.max_batch_tokens",
         "at least decode.block_size (16) with chunked prefill"),
        (S(decode={"chunked_prefill": True}, prefill={"max_batch_tokens": 8}),
         "prefill.max_batch_tokens", "chunks are whole blocks"),
        (S(prefill={"kv_cache": {"blocks": 4, "memory": "1GiB"}}), "prefill.kv_cache", "give one of"),
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


def test_address_override_is_validated_and_keeps_the_rest() -> None:
    spec = load_spec(DEPLOY / "local-tp3.yaml")
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


# --- one GPU shared by workers ------------------------------------------------------------


def test_gpu_1x_puts_a_prefill_rank_and_a_decode_replica_on_one_gpu() -> None:
    from pdserve.cluster.launch.deployment import _device_slot

    c = resolve(load_spec(DEPLOY / "gpu-1x.yaml"), gpus_available=True)
    assert c.model.device == "cuda" and c.kv_backend == "auto"  # cuda_ipc between the two
    assert c.prefill is not None and (c.prefill_instances, c.prefill_tp) == (1, 1)
    slots = [_device_slot(c, "prefill"), _device_slot(c, "decode")]
    assert slots == [{"GPU": 0.5}, {"GPU": 0.5}]  # Ray's fractional GPUs: one GPU in all
    assert c.decode.kv_cache == KVCacheSize(memory_fraction=0.8)  # of the replica's half


def test_whole_gpus_and_cpu_slots_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve.cluster.launch.deployment import _device_slot

    monkeypatch.setenv("PDSERVE_API_KEY", "sk-test")
    gpu = resolve(load_spec(GPU_SPEC), gpus_available=True)
    assert [_device_slot(gpu, p) for p in ("prefill", "decode")] == [{"GPU": 1.0}] * 2
    cpu = settle(load_spec(DEPLOY / "local.yaml"), "cpu")
    assert [_device_slot(cpu, p) for p in ("prefill", "decode")] == [{"CPU": 1.0}] * 2


@pytest.mark.parametrize(
    ("data", "gpus", "hint"),
    [
        (S(decode={"gpus_per_worker": 1.5}), True, "decode.gpus_per_worker: must be <= 1"),
        (S(decode={"gpus_per_worker": 0}), True, "decode.gpus_per_worker: must be > 0"),
        (S(decode={"gpus_per_worker": 0.5}), False, "decode.gpus_per_worker: only applies on GPUs"),
        (S(model={"device": "cuda"}, prefill={"tensor_parallel_size": 2, "gpus_per_worker": 0.5}),
         True, "prefill.gpus_per_worker: 0.5 would put ranks of a tensor-parallel group"),
    ],
)  # fmt: skip
def test_bad_gpu_shares_name_the_fix(data: dict[str, Any], gpus: bool, hint: str) -> None:
    problems = resolve_problems(data, gpus)
    assert any(p.startswith(hint) for p in problems), problems
