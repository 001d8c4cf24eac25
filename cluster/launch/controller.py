"""The controller: one detached Ray actor per deployment, owning its workers and HTTP server.

``pdserve up`` creates it (named ``controller`` in the deployment's namespace); ``pdserve status``
and ``pdserve down`` find it by that name. The router, frontend, job manager and the uvicorn server
all run on the actor's one event loop, so a request never hops threads on the control path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

import ray
import uvicorn
from ray.util import get_placement_group
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pdserve.cluster.launch.deployment import Deployment
from pdserve.cluster.launch.healer import Healer
from pdserve.cluster.launch.status_rows import decode_row, prefill_row
from pdserve.cluster.serving.admission import AdmissionGate
from pdserve.cluster.serving.http_server import bind_socket, make_server, serve, wait_started
from pdserve.cluster.serving.jobs import JobManager
from pdserve.cluster.serving.metrics import ServingMetrics
from pdserve.cluster.serving.native_api import make_native_router
from pdserve.cluster.serving.server import create_app
from pdserve.engine.config import ModelConfig
from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.frontend import Frontend

logger = logging.getLogger(__name__)

CONTROLLER_NAME = "controller"
LOAD_REFRESH_S = 1.0
# Ray restarts a controller whose process died (a crash, an OOM kill, SIGKILL) this many times;
# the restarted one starts the deployment afresh (its workers died with the old process)
CONTROLLER_MAX_RESTARTS = 100


class Controller:
    """Ray actor (async, detached). Start with ``launch``; stop with ``shutdown``."""

    def __init__(self, config: DeploymentConfig, detached: bool = False) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config = config
        self.detached = detached
        self.started = time.time()
        self._deployment: Deployment | None = None
        self._healer: Healer | None = None
        self._frontend: Frontend | None = None
        self._gate: AdmissionGate | None = None
        self._jobs: JobManager | None = None
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = asyncio.Event()
        self.reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        if self.reconstructed:
            # Ray restarted this actor after its process died. The workers died with that
            # process (they were its actors), so start the deployment again: a fresh one, its
            # stale placement groups removed, interrupted jobs resumed, the same port.
            logger.warning("controller of %s restarted after a crash: redeploying", config.name)
            ray.get_runtime_context().current_actor.restart.remote()

    async def start(self) -> str:
        """Start the workers, then serve HTTP; returns the base URL once it answers."""
        r = self.config
        # bound first: a taken port or a foreign host fails now, before any worker starts
        self._socket = bind_socket(r.server.host, r.server.port)
        model = await asyncio.to_thread(ModelConfig.of, r.model)
        tokenizer = await asyncio.to_thread(load_tokenizer, r.model.path)
        _remove_stale_groups(r)
        self._deployment = await Deployment.start(r, model, detached=self.detached)
        frontend = Frontend(
            self._deployment.router,
            tokenizer,
            model.max_model_len,
            max_inflight=r.router.max_queued_requests,
        )
        self._frontend = frontend
        # one exact bound on the requests in flight, whichever API sends them
        gate: Any = AdmissionGate(frontend, r.router.max_queued_requests)
        self._gate = gate
        self._jobs = JobManager(gate, r.server.jobs_dir) if r.server.jobs_dir else None
        self.metrics = ServingMetrics(
            r.server.served_model_name, prefill_pool=r.prefill is not None
        )
        healer = Healer(self._deployment, r.router)  # dead workers replaced (self-healing)
        self._healer = healer
        self.metrics.before_render = lambda: self.metrics.set_recovery(**healer.summary())
        app = create_app(
            gate,
            r.server,
            extra_routers=[make_native_router(gate, self._jobs)],
            status=self.status,
            metrics=self.metrics,
        )
        server = make_server(app, r.server.host, r.server.port)
        self._server = server
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        serving = loop.create_task(serve(server, self._socket))
        self._tasks = [serving, loop.create_task(self._refresh_load())]
        if r.router.max_restarts > 0:
            self._tasks.append(loop.create_task(healer.run()))
        await wait_started(server, serving)
        if self._jobs is not None:  # jobs a stop or a crash cut off go on where they stopped
            self._jobs.resume()
        return f"http://{r.server.host}:{r.server.port}"

    async def restart(self) -> None:
        """``start`` again in a restarted controller (called by its own ``__init__``)."""
        try:
            url = await self.start()
        except Exception:
            logger.exception("the restarted controller of %s could not start", self.config.name)
            raise
        logger.warning("controller of %s restarted: serving again at %s", self.config.name, url)

    async def _refresh_load(self) -> None:
        while True:
            await asyncio.sleep(LOAD_REFRESH_S)
            with contextlib.suppress(Exception):  # a status blip must not stop serving
                dep = self._deployment
                assert dep is not None
                # one dead replica's error must not blind the gauges: the live ones still count
                replies = await asyncio.gather(
                    *(_bounded(d.stats.remote()) for d in dep.decode), return_exceptions=True
                )
                live = [(i, x) for i, x in enumerate(replies) if not isinstance(x, BaseException)]
                self.metrics.set_speculation({i: x.spec for i, x in live if x.spec})
                self.metrics.set_kv_backends({i: x.kv_bytes_by_backend for i, x in live})
                loads = [x.load for _, x in live]
                total = sum(x.total_blocks for x in loads)
                used = total - sum(x.free_blocks for x in loads)
                queued = sum(p.queued_requests for p in dep.router.prefill)
                self.metrics.set_load(
                    used / max(total, 1),
                    sum(x.running for x in loads),
                    sum(x.waiting for x in loads),
                    queued,
                )

    async def status(self) -> dict[str, Any]:
        """Pools, instances, KV usage, queue depths and links, as plain data."""
        dep = self._deployment
        r = self.config
        if dep is None:
            return {"name": r.name, "state": "starting"}
        stats = await asyncio.gather(
            *(_bounded(d.stats.remote()) for d in dep.decode), return_exceptions=True
        )
        pstats = await asyncio.gather(
            *(_bounded(p.leader.stats.remote()) for p in dep.prefill), return_exceptions=True
        )
        healer = self._healer
        assert healer is not None
        estimates = dep.router.estimated_cached_blocks  # pools routed cache_aware
        return {
            "name": r.name,
            "namespace": r.namespace,
            "state": "serving",
            "mode": r.mode,
            "model": r.model.path,
            "url": f"http://{r.server.host}:{r.server.port}",
            "uptime_s": round(time.time() - self.started, 1),
            "inflight": self._gate.inflight if self._gate else 0,
            "recovery": healer.summary(),
            "prefill": [
                prefill_row(p, ps, healer, estimates)
                for p, ps in zip(dep.router.prefill, pstats, strict=True)
            ],
            "decode": [decode_row(i, s, healer, estimates) for i, s in enumerate(stats)],
        }

    async def debug_handles(self) -> dict[str, list[Any]]:
        """Worker actor handles (tests check where Ray placed them)."""
        assert self._deployment is not None
        ranks = [r for p in self._deployment.prefill for r in p.ranks]
        return {"prefill": ranks, "decode": list(self._deployment.decode)}

    async def check_integrity(self) -> int:
        """Every live decode replica's and prefill leader's block check; returns requests still
        held (0 when idle)."""
        assert self._deployment is not None
        dead = self._deployment.router.dead_instances
        leaders = [p.leader for p in self._deployment.prefill if p.index not in dead["prefill"]]
        decode = [h for j, h in enumerate(self._deployment.decode) if j not in dead["decode"]]
        counts = await asyncio.gather(*(w.check_integrity.remote() for w in [*decode, *leaders]))
        return sum(counts)

    async def shutdown(self) -> None:
        """Stop serving, stop jobs (interrupted: the next start resumes them), kill the workers."""
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        if self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._tasks[0], timeout=10)
        if self._jobs is not None:
            await self._jobs.close()
        if self._deployment is not None:
            self._deployment.shutdown()
            self._deployment = None
        if self._socket is not None:
            self._socket.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def _remove_stale_groups(config: DeploymentConfig) -> None:
    """Remove placement groups a crashed controller of this deployment left behind (launch only
    starts a controller when none runs under the name), so their names can be reused."""
    for i in range(config.prefill_instances):
        name = f"{config.link_prefix}-prefill{i}"
        try:
            pg = get_placement_group(name)
        except ValueError:  # none: the usual case
            continue
        logger.warning("removing placement group %s left by a controller that died", name)
        remove_placement_group(pg)


async def _bounded(ref: Any, timeout: float = LOAD_REFRESH_S * 5) -> Any:
    """A worker's reply, or TimeoutError: a hung worker must not stall the refresh."""
    return await asyncio.wait_for(ref, timeout)


ControllerActor: Any = ray.remote(Controller)


def launch(config: DeploymentConfig, *, detached: bool) -> tuple[Any, str]:
    """Create the controller on this node (where the HTTP port is expected) and start it."""
    node = ray.get_runtime_context().get_node_id()
    existing = find_controller(config.namespace)
    if existing is not None:
        raise RuntimeError(
            f"a deployment named {config.name!r} is already running in namespace "
            f"{config.namespace!r}: `pdserve down -n {config.name}` first, or pick another name"
        )
    actor: Any = ControllerActor.options(
        name=CONTROLLER_NAME,
        namespace=config.namespace,
        num_cpus=0,
        lifetime="detached" if detached else None,
        max_concurrency=100_000,
        max_restarts=CONTROLLER_MAX_RESTARTS,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(config, detached)
    try:
        url = str(ray.get(actor.start.remote()))
    except BaseException:
        with contextlib.suppress(Exception):
            ray.get(actor.shutdown.remote(), timeout=30)
        ray.kill(actor)
        raise
    return actor, url


def find_controller(namespace: str) -> Any | None:
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    except ValueError:
        return None
