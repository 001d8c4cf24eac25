"""Multi-node placement: several raylets on this machine with different custom resources stand in
for prefill and decode nodes; actors land where the spec's resources say and KV crosses nodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
from cluster_helpers import deploy_spec, hf_greedy
from ray.cluster_utils import Cluster

from pdserve.cluster.config.resolve import resolve
from pdserve.cluster.config.spec import load_spec
from pdserve.cluster.launch.controller import launch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    if ray.is_initialized():  # the other modules' local instance: this driver joins its own
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    prefill = c.add_node(num_cpus=2, resources={"prefill": 2})
    decode = c.add_node(num_cpus=2, resources={"decode": 2})
    c.wait_for_nodes()
    # ray.init, not init_ray: init_ray's token-auth switch re-reads Ray's config, which would
    # drop the settings this process gave the cluster it started itself (its actors are then
    # cancelled); `pdserve status/down --address` test that path in a fresh process
    ray.init(address=c.address)
    yield {"prefill": prefill.node_id, "decode": decode.node_id}
    ray.shutdown()
    c.shutdown()


def test_actors_follow_resources_and_kv_crosses_nodes(
    cluster: dict[str, str], tiny_dirs: dict[str, Path]
) -> None:
    spec = deploy_spec(
        "deploy/local-tp3.yaml",
        "itest-multinode",
        tiny_dirs["llama"],
        prefill={"resources": {"prefill": 1}, "tensor_parallel_size": 2},
        decode={"resources": {"decode": 1}},
    )
    actor, url = launch(resolve(load_spec(spec), gpus_available=False), detached=False)
    try:
        dep: Any = ray.get(actor.debug_handles.remote())
        prefill_nodes = ray.get([r.node_id.remote() for r in dep["prefill"]])
        decode_nodes = ray.get([d.node_id.remote() for d in dep["decode"]])
        assert set(prefill_nodes) == {cluster["prefill"]}  # both TP ranks, STRICT_PACK
        assert set(decode_nodes) == {cluster["decode"]}
        prompt = list(range(10, 60))
        body = {
            "model": "tiny-llama",
            "prompt": prompt,
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 1,
        }
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        ref = hf_greedy(tiny_dirs["llama"], [prompt], 16)[0]
        text = r.json()["choices"][0]["text"]
        from transformers import AutoTokenizer

        assert text == AutoTokenizer.from_pretrained(tiny_dirs["llama"]).decode(
            ref, skip_special_tokens=True
        )
        status = ray.get(actor.status.remote())
        assert sum(d["links"] for d in status["decode"]) >= 1
        assert ray.get(actor.check_integrity.remote()) == 0
    finally:
        ray.get(actor.shutdown.remote(), timeout=120)
        ray.kill(actor)
