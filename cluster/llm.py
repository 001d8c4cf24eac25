"""Offline API: ``LLM(model).generate(prompts, params)`` over a real prefill -> decode cluster."""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, cast

import ray
from tqdm import tqdm

from pdserve.cluster.config.keywords import llm_spec, resolve_llm_spec
from pdserve.cluster.config.resolve import settle
from pdserve.cluster.launch.deployment import Deployment
from pdserve.cluster.launch.ray_env import ensure_ray
from pdserve.cluster.loop import LoopThread
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import namespace_for
from pdserve.engine.request import RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import apply_chat_template, load_tokenizer
from pdserve.router.frontend import Frontend, OutputDelta

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
Conversation = Sequence[Mapping[str, str]]  # [{"role": "user", "content": "..."}, ...]


class LLM:
    """A prefill pool (TP groups) and a decode pool (replicas) on Ray, driven in-process.

    ``LLM(model, **keywords)``: every keyword sets one key of the deploy spec (the YAML that
    ``pdserve up`` reads), through the same validation and resolution: ``mode``, ``dtype``,
    ``device``, ``max_model_len``, ``served_model_name``, ``prefill_instances``,
    ``prefill_tensor_parallel_size``, ``max_batch_tokens``, ``max_batch_size``,
    ``decode_instances``, ``max_num_seqs``, ``block_size``, ``num_kv_blocks``,
    ``kv_cache_memory``, ``enable_chunked_prefill``, ``max_num_batched_tokens``,
    ``kv_transfer_backend``, ``prefill_policy``, ``decode_policy``, ``ray_address``,
    ``num_threads``, ``attention_backend`` (auto, sdpa, flex), ``enforce_eager`` (no CUDA
    graphs), ``cudagraph_capture_sizes``, ``gpus_per_worker`` and ``prefill_gpus_per_worker``
    (a worker's share of a GPU: 0.5 each runs 1P1D on one GPU), ``start_timeout_s`` (how long
    the workers may take to be placed and loaded before the start fails). The table is
    ``spec_schema.llm_keywords()``; None means the default.

    ``mode="colocated"`` is the baseline instead: ``decode_instances`` instances, each running
    both phases on the same engine with continuous batching and prefill priority, or with
    ``enable_chunked_prefill=True`` vLLM's chunked prefill: each step decodes the running
    sequences, then fills ``max_num_batched_tokens`` (default 2048; 8192 prompt tokens a
    prefill-only step without chunking) with chunks of waiting prompts.

    ``LLM(model)`` starts a local Ray instance when none is running (and stops it on shutdown).
    Use it as a context manager, or call ``shutdown()``, to release the actors and KV links.
    """

    def __init__(self, model: str | None = None, **keywords: Any) -> None:
        spec = llm_spec(model, keywords)  # a bad keyword raises here, before Ray starts
        namespace = namespace_for(spec.name)
        self._owns_ray = ensure_ray(spec.ray.address, settle(spec, "cpu").num_actors, namespace)
        self._loop = LoopThread()
        try:
            gpus = ray.cluster_resources().get("GPU", 0) > 0
            self.config = resolve_llm_spec(spec, gpus_available=gpus)
            self.model_config = ModelConfig.of(self.config.model)
            self.tokenizer = load_tokenizer(self.config.model.path)
            self.deployment = self._loop.run(Deployment.start(self.config, self.model_config))
        except BaseException:
            self._release()
            raise
        self.frontend = Frontend(
            self.deployment.router, self.tokenizer, self.model_config.max_model_len
        )

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order.

        Every prompt is validated before any work starts, so a bad one raises
        ``InvalidRequestError`` and nothing runs.
        """
        batch = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(batch))
        ids = [self.frontend.tokenize(p) for p in batch]

        async def run_all() -> list[RequestOutput]:
            bar = tqdm(total=len(batch), desc="generate", disable=not use_tqdm)

            async def one(i: int) -> RequestOutput:
                out = await self.frontend.generate(ids[i], params[i])
                prompt = batch[i]
                out.prompt = prompt if isinstance(prompt, str) else None
                bar.update(1)
                return out

            try:
                return list(await asyncio.gather(*(one(i) for i in range(len(batch)))))
            finally:
                bar.close()

        return self._loop.run(run_all())

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of ``{"role", "content"}`` maps) or several, each
        rendered with the model's chat template; generation stops at the model's end of turn.
        Outputs in conversation order."""
        return self.generate(self.chat_prompts(messages), sampling_params, use_tqdm=use_tqdm)

    def chat_prompts(self, messages: Conversation | Sequence[Conversation]) -> list[list[int]]:
        """Token ids of each conversation rendered with the chat template, ready for a reply."""
        one = bool(messages) and isinstance(messages[0], Mapping)
        conversations = cast(Sequence[Conversation], [messages] if one else messages)
        return [apply_chat_template(self.tokenizer, [dict(m) for m in c]) for c in conversations]

    def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None
    ) -> Iterator[OutputDelta]:
        """Yield deltas of one request as decode produces them."""
        params = sampling_params or SamplingParams()
        ids = self.frontend.tokenize(prompt)
        deltas: queue.Queue[OutputDelta | BaseException | None] = queue.Queue()

        async def pump() -> None:
            try:
                async for delta in self.frontend.stream(ids, params):
                    deltas.put(delta)
            except BaseException as e:  # handed to the caller's thread
                deltas.put(e)
            finally:
                deltas.put(None)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop.loop)
        try:
            while (item := deltas.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def check_integrity(self) -> int:
        """Raise unless every decode replica's and live prefill instance's blocks are all
        accounted for; returns how many requests both pools still hold (0 when idle)."""

        async def check() -> list[int]:
            dead = set(self.deployment.router.dead_instances["prefill"])
            leaders = [p.leader for p in self.deployment.prefill if p.index not in dead]
            workers = [*self.deployment.decode, *leaders]
            return list(await asyncio.gather(*(w.check_integrity.remote() for w in workers)))

        return sum(self._loop.run(check()))

    def shutdown(self) -> None:
        """Kill the actors (closing their KV links) and stop Ray if this LLM started it."""
        if getattr(self, "deployment", None) is not None:
            self.deployment.shutdown()
            self.deployment = None  # type: ignore[assignment]
        self._release()

    def _release(self) -> None:
        self._loop.stop()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if not items:
        raise InvalidRequestError("no prompts given: pass a string, token ids, or a list of them")
    if all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]  # one prompt given as token ids
    return items  # type: ignore[return-value]


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequestError(
            f"got {len(params)} sampling params for {n} prompts: pass one or {n}"
        )
    return params


__all__ = ["LLM"]
