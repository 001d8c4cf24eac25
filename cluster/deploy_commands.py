"""``pdserve up``, ``status`` and ``down``: a deployment's lifetime on a Ray cluster."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Any

import ray
import torch
from rich.console import Console
from rich.table import Table

from pdserve.cluster.controller import find_controller, launch
from pdserve.cluster.spec import (
    SpecError,
    default_spec_path,
    load_spec,
    resolve,
    with_ray_address,
)


def namespace_of(name: str) -> str:
    return f"pdserve-{name}"


def up(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        spec = load_spec(args.file or default_spec_path())
        if args.address:
            spec = with_ray_address(spec, args.address)
    except SpecError as e:
        console.print(f"[red]invalid deploy spec[/]:\n{e}")
        return 2
    address = spec.ray.address
    if args.detach and not address:
        console.print(
            "[red]--detach needs a running Ray cluster[/]: start one with "
            "`ray start --head` and pass `--address auto`"
        )
        return 2
    if address:
        ray.init(address=address, namespace="pdserve", log_to_driver=False)
        gpus = ray.cluster_resources().get("GPU", 0) > 0
    else:
        gpus = torch.cuda.is_available()
    try:
        resolved = resolve(spec, gpus_available=gpus)
    except SpecError as e:
        console.print(f"[red]invalid deploy spec[/]:\n{e}")
        return 2
    if not address:
        cpus = max(resolved.cluster.num_actors, os.cpu_count() or 1)
        ray.init(num_cpus=cpus, namespace="pdserve", include_dashboard=False, log_to_driver=False)
    c = resolved.cluster
    what = (
        f"{c.decode_instances} colocated instance(s)"
        if c.colocated
        else f"{c.prefill_instances} prefill instance(s) x TP{c.prefill_tp}, "
        f"{c.decode_instances} decode replica(s)"
    )
    with console.status(
        f"deploying [bold]{resolved.name}[/]: {what} on {c.engine.device}, model {c.engine.model}"
    ):
        start = time.perf_counter()
        actor, url = launch(resolved, detached=args.detach)
    console.print(f"ray cluster: {ray.get_runtime_context().gcs_address}", highlight=False)
    console.print(
        f"[green]serving[/] {resolved.name} at {url} "
        f"(ready in {time.perf_counter() - start:.1f} s)\n"
        f"  try: curl {url}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{resolved.server.served_model_name}", '
        f'"prompt": "Hello", "max_tokens": 16}}\'\n'
        f"  status: pdserve status -n {resolved.name}    stop: pdserve down -n {resolved.name}",
        highlight=False,
    )
    if args.detach:
        return 0
    # SIGTERM (systemd, docker stop, kill) stops it as cleanly as Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ray.get(actor.wait_closed.remote())  # until `pdserve down`, Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        console.print("shutting down…")
        ray.get(actor.shutdown.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        pass  # `pdserve down` killed it
    ray.kill(actor)
    console.print(f"deployment {resolved.name!r} stopped")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _connect(args: argparse.Namespace) -> Any:
    ray.init(address=args.address, namespace=namespace_of(args.name), log_to_driver=False)
    return find_controller(namespace_of(args.name))


def status(args: argparse.Namespace) -> int:
    console = Console()
    controller = _connect(args)
    if controller is None:
        console.print(f"no deployment named {args.name!r} on this Ray cluster")
        return 1
    info = ray.get(controller.status.remote(), timeout=30)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console.print(
        f"[bold]{info['name']}[/] {info['state']} at {info.get('url')} "
        f"({info.get('mode')}, model {info.get('model')}, up {info.get('uptime_s')} s, "
        f"{info.get('inflight')} in flight)",
        highlight=False,
    )
    console.print(_table("prefill pool", info.get("prefill", [])))
    console.print(_table("decode pool", info.get("decode", [])))
    return 0


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    keys = list(dict.fromkeys(k for row in rows for k in row))  # a dead instance has fewer
    for key in keys or ["(none)"]:
        table.add_column(key)
    for row in rows:
        values = (row.get(k, "-") for k in keys)
        table.add_row(*(", ".join(v) if isinstance(v, list) else str(v) for v in values))
    return table


def down(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    controller = _connect(args)
    if controller is None:
        console.print(f"no deployment named {args.name!r} on this Ray cluster")
        return 1
    try:
        ray.get(controller.shutdown.remote(), timeout=120)
    except ray.exceptions.RayActorError:
        # a foreground `pdserve up` kills its controller as soon as shutdown has closed it,
        # which can beat shutdown's reply to us: the deployment is down all the same
        pass
    else:
        ray.kill(controller)
    console.print(f"[green]deployment {args.name!r} is down[/]")
    return 0
