"""What ``pdserve up`` settles before it launches anything: the deploy spec, resolved on the Ray
cluster it names (joined here) or for this machine, and whether the server can listen here.

Ray and torch load when these run, not when ``cluster.cli.deploy`` is imported (``--help`` stays
fast).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:  # annotations only: it imports Ray and torch
    from pdserve.engine.deploy_config import DeploymentConfig


def resolve_spec(args: argparse.Namespace, console: Console) -> DeploymentConfig | None:
    """The spec, resolved on the Ray cluster it names (joined here), or for this machine (`up`
    then starts a local Ray instance, once the spec says how many actors it needs); None
    (after saying why) if bad."""
    import ray
    import torch

    from pdserve.cluster.config.resolve import resolve
    from pdserve.cluster.config.spec import (
        SpecError,
        default_spec_path,
        load_spec,
        with_ray_address,
    )
    from pdserve.cluster.launch.ray_env import RayAddressError, init_ray

    try:
        spec = load_spec(args.file or default_spec_path())
        if args.address:
            spec = with_ray_address(spec, args.address)
        address = spec.ray.address
        if args.detach and not address:
            console.print(
                "[red]--detach needs a running Ray cluster[/]: start one with "
                "`ray start --head` and pass `--address auto`"
            )
            return None
        if address:
            init_ray(address, namespace="pdserve")  # RayAddressError when none answers
        gpus = ray.cluster_resources().get("GPU", 0) > 0 if address else torch.cuda.is_available()
        resolved = resolve(spec, gpus_available=gpus)
    except SpecError as e:
        console.print(f"[red]invalid deploy spec[/]:\n{e}")
        return None
    except RayAddressError as e:
        console.print(f"[red]cannot reach Ray[/]: {e}", highlight=False)
        return None
    return resolved


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port here (None if it can), checked by binding
    and closing a socket as the server will."""
    from pdserve.cluster.serving.http_server import ListenError, bind_socket

    try:
        bind_socket(host, port).close()
    except ListenError as e:
        return str(e)
    return None
