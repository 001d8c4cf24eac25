"""Offline API: ``LLM(model).generate(prompts, params)`` over a real prefill -> decode cluster."""

from __future__ import annotations

import asyncio
import logging
import queue
import uuid
from collections.abc import Iterator, Sequence
from types import TracebackType

import ray
from tqdm import tqdm

from pdserve.cluster.deployment import ClusterSpec, Deployment
from pdserve.cluster.loop import LoopThread
from pdserve.cluster.ray_env import ensure_ray
from pdserve.engine.config import ModelConfig
from pdserve.engine.request import RequestOutput
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.spec import EngineSpec, step_token_budget
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.frontend import Frontend, OutputDelta
from pdserve.router.router import RouterConfig

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


def resolve_device(device: str) -> str:
    """``auto``: CUDA when the Ray cluster has GPUs, else CPU."""
    if device == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is unknown; use 'auto', 'cpu' or 'cuda'")
    return device


class LLM:
    """A prefill pool (TP groups) and a decode pool (replicas) on Ray, driven in-process.

    ``mode="colocated"`` is the baseline instead: ``decode_instances`` instances, each running
    both phases on the same engine with continuous batching and prefill priority, or with
    ``enable_chunked_prefill=True`` vLLM's chunked prefill: each step decodes the running
    sequences, then fills ``max_num_batched_tokens`` (default 2048; 8192 prompt tokens a
    prefill-only step without chunking) with chunks of waiting prompts.

    ``LLM(model)`` starts a local Ray instance when none is running (and stops it on shutdown).
    Use it as a context manager, or call ``shutdown()``, to release the actors and KV links.
    """

    def __init__(
        self,
        model: str,
        *,
        prefill_tensor_parallel_size: int = 1,
        decode_instances: int = 1,
        prefill_instances: int = 1,
        mode: str = "disaggregated",
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_batch_tokens: int = 8192,
        enable_chunked_prefill: bool = False,
        max_num_batched_tokens: int | None = None,
        kv_transfer_backend: str = "auto",
        num_threads: int = 1,
        ray_address: str | None = None,
    ) -> None:
        self.config = ModelConfig.from_pretrained(
            model, dtype=dtype, device="cpu", max_model_len=max_model_len
        )
        self.tokenizer = load_tokenizer(model)
        if mode not in ("disaggregated", "colocated"):
            raise ValueError(f"mode={mode!r} is unknown; use 'disaggregated' or 'colocated'")
        if mode == "colocated":  # decode_instances instances, each running both phases
            prefill_instances = 0
        elif enable_chunked_prefill or max_num_batched_tokens is not None:
            raise ValueError(
                "enable_chunked_prefill and max_num_batched_tokens only apply to "
                "mode='colocated' (prefill instances run whole prompts: see max_batch_tokens)"
            )
        step_budget = step_token_budget(
            max_num_batched_tokens, max_num_seqs, enable_chunked_prefill
        )
        namespace = f"pdserve-{uuid.uuid4().hex[:8]}"
        needed = prefill_instances * prefill_tensor_parallel_size + decode_instances
        self._owns_ray = ensure_ray(ray_address, needed, namespace)
        self._loop = LoopThread()
        engine = EngineSpec(
            model,
            dtype,
            resolve_device(device),
            max_model_len,
            num_threads,
            kv_transfer_backend,
            block_size,
        )
        self.spec = ClusterSpec(
            engine=engine,
            prefill_instances=prefill_instances,
            prefill_tp=prefill_tensor_parallel_size,
            decode_instances=decode_instances,
            max_batch_tokens=max_batch_tokens,
            max_num_seqs=max_num_seqs,
            num_kv_blocks=num_kv_blocks,
            max_num_batched_tokens=step_budget,
            chunked_prefill=enable_chunked_prefill,
            router=RouterConfig(block_size=block_size, link_prefix=namespace),
        )
        try:
            self.deployment = self._loop.run(Deployment.start(self.spec, self.config))
        except BaseException:
            self._release()
            raise
        self.frontend = Frontend(self.deployment.router, self.tokenizer, self.config.max_model_len)

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
        """Raise unless every decode replica's blocks are all accounted for; returns how many
        requests the decode pool still holds (0 when idle)."""

        async def check() -> list[int]:
            decode = self.deployment.decode
            return list(await asyncio.gather(*(d.check_integrity.remote() for d in decode)))

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
