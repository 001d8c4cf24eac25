"""``pdserve up``, ``status`` and ``down``: a deployment's lifetime on a Ray cluster.

Ray and torch load when one of them runs, not when its flags are built (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from pdserve.cluster.cli.deploy_preflight import listen_problem, resolve_spec

DEFAULT_DEPLOYMENT = "local"
UP_DESCRIPTION = (
    "Validate the deploy spec, place each prefill instance's TP ranks in a STRICT_PACK placement "
    "group and the decode replicas on the decode resources, and serve the OpenAI-compatible and "
    "native APIs."
)


def add_args(command: str, p: argparse.ArgumentParser) -> None:
    if command == "up":
        p.description = UP_DESCRIPTION
        _add_up_args(p)
        return
    p.add_argument(
        "-n",
        "--name",
        default=DEFAULT_DEPLOYMENT,
        help=f"deployment name, the spec's `name` (default: {DEFAULT_DEPLOYMENT})",
    )
    p.add_argument(
        "--address",
        default=None,
        help="the Ray cluster's address, as `pdserve up` printed it (`ray cluster: ...`); "
        "default: the address `up` recorded for this deployment name on this machine. `auto` "
        "joins the cluster this node belongs to (on a host running several, any of them)",
    )
    if command == "status":
        p.add_argument("--json", action="store_true", help="print the raw status as JSON")


def run(command: str, args: argparse.Namespace) -> int:
    return {"up": up, "status": status, "down": down}[command](args)


def _add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--file",
        default=None,
        help="deploy spec YAML (default: the embedded deploy/local.yaml)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to deploy onto ('auto' = the running one); default: the "
        "spec's ray.address, else a local Ray instance that lives as long as `up`",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once serving (needs a running Ray cluster: --address)",
    )


def up(args: argparse.Namespace) -> int:
    import ray  # Ray and torch from here on

    from pdserve.cluster.launch import address_book
    from pdserve.cluster.launch.controller import launch

    console = Console(stderr=True)
    resolved = resolve_spec(args, console)
    if resolved is None:
        return 2
    c = resolved
    if not c.ray_address:
        # the controller will run on this machine: a taken port fails now, before Ray starts
        if taken := listen_problem(c.server.host, c.server.port):
            console.print(f"[red]deploying {c.name!r} failed[/]: {taken}", highlight=False)
            return 1
        from pdserve.cluster.launch.ray_env import init_ray

        init_ray(namespace="pdserve", num_cpus=max(c.num_actors, os.cpu_count() or 1))
    what = (
        f"{c.decode.instances} colocated instance(s)"
        if c.prefill is None
        else f"{c.prefill_instances} prefill instance(s) x TP{c.prefill_tp}, "
        f"{c.decode.instances} decode replica(s)"
    )
    with console.status(
        f"deploying [bold]{c.name}[/]: {what} on {c.model.device}, model {c.model.path}"
    ):
        start = time.perf_counter()
        try:
            actor, url = launch(resolved, detached=args.detach)
        except Exception as e:  # the cause, not a Ray traceback: a port, a host, a spec
            console.print(f"[red]deploying {c.name!r} failed[/]: {_cause(e)}", highlight=False)
            return 1
    address = ray.get_runtime_context().gcs_address
    console.print(f"ray cluster: {address}", highlight=False)
    address_book.record(resolved.name, address, url)  # where `status` and `down` look
    console.print(
        f"[green]serving[/] {resolved.name} at {url} "
        f"(ready in {time.perf_counter() - start:.1f} s)\n"
        f"  try: curl {url}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{resolved.server.served_model_name}", '
        f'"prompt": "Hello", "max_tokens": 16}}\'\n'
        f"  status: pdserve status -n {resolved.name}    stop: pdserve down -n {resolved.name}",
        highlight=False,
    )
    if not args.detach:
        try:
            _serve_until_down(actor, console)
        finally:
            address_book.forget(resolved.name)  # its local Ray instance ends with `up`
        console.print(f"deployment {resolved.name!r} stopped")
    return 0


def _serve_until_down(actor: Any, console: Console) -> None:
    """Wait for the controller to close: `pdserve down`, Ctrl-C or SIGTERM."""
    import ray

    # SIGTERM (systemd, docker stop, kill) stops it as cleanly as Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            try:
                ray.get(actor.wait_closed.remote())
                break
            except ray.exceptions.RayActorError:
                # `pdserve down` killed it, or its process died and Ray restarts it (the
                # restarted controller redeploys by itself): wait on that one
                if not _restarting(actor):
                    break
                console.print("the controller died; Ray restarted it, redeploying…")
    except KeyboardInterrupt:
        console.print("shutting down…")
        ray.get(actor.shutdown.remote(), timeout=60)
    ray.kill(actor)


def _restarting(actor: Any) -> bool:
    """Whether the controller is being restarted by Ray (alive again within 60 s)."""
    import ray

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
    return True


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _connect(args: argparse.Namespace) -> Any:
    from pdserve.cluster.launch import address_book
    from pdserve.cluster.launch.controller import find_controller
    from pdserve.cluster.launch.ray_env import RayAddressError, init_ray
    from pdserve.engine.deploy_config import namespace_for

    address = args.address or address_book.lookup(args.name)
    if address is None:
        raise RayAddressError(
            f"no Ray address is recorded for deployment {args.name!r} on this machine (`pdserve "
            "up` records it while it runs): pass --address with the `ray cluster:` address "
            "`up` printed, or check the name with -n"
        )
    init_ray(address, namespace=namespace_for(args.name))
    return find_controller(namespace_for(args.name))


def _cause(e: BaseException) -> str:
    """The error a Ray task raised (its ``cause``), as one line."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def status(args: argparse.Namespace) -> int:
    import ray

    from pdserve.cluster.launch.ray_env import RayAddressError

    console = Console()
    try:
        controller = _connect(args)
    except RayAddressError as e:
        console.print(f"cannot reach Ray: {e}", highlight=False)
        return 1
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
    if (rec := info.get("recovery")) is not None:
        console.print(
            f"deaths {rec['deaths']}, restarts {rec['restarts']}, migrations "
            f"{rec['migrations']}, prefill retries {rec['prefill_retries']}",
            highlight=False,
        )
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
    import ray

    from pdserve.cluster.launch import address_book
    from pdserve.cluster.launch.ray_env import RayAddressError

    console = Console(stderr=True)
    try:
        controller = _connect(args)
    except RayAddressError as e:
        console.print(f"cannot reach Ray: {e}", highlight=False)
        return 1
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
    if args.address is None:
        address_book.forget(args.name)
    console.print(f"[green]deployment {args.name!r} is down[/]")
    return 0
