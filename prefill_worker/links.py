"""One prefill rank's KV links: one to each decode replica it sends to, joined when the router
asks (``connect_link``), with the deployment's secret (``kv_transfer.auth``).

A link is never aborted under a running step: one replaced or dropped meanwhile is retired and
aborted when the step ends (its decode receiver then stops). A step that died half-sent, or
whose sends failed on a link, drops the links it used (``drop_used``), so the router makes new
ones and the decode side fails only the transfers that were in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import torch

from pdserve.engine.deploy_config import DeploymentConfig
from pdserve.kv_transfer.auth import GroupAuth
from pdserve.kv_transfer.link import SENDER, KVLink


class RankLinks:
    """This rank's links by decode replica, and whether a step is running on them."""

    def __init__(self, deployment: DeploymentConfig, device: torch.device) -> None:
        self.deployment = deployment
        self.device = device
        self.executing = False  # a batch is running on this rank
        self._links: dict[int, KVLink] = {}
        self._retired: list[KVLink] = []  # links replaced mid-batch, aborted after it

    async def connect(self, decode_instance: int, name: str, host: str, port: int) -> None:
        """Join the link a decode replica is hosting, in place of any earlier one to it."""
        backend = self.deployment.kv_backend  # the two ends agree on what it means here
        auth = GroupAuth(self.deployment.link_secret, hosting=False)
        link = await asyncio.to_thread(
            KVLink.connect, name, backend, SENDER, self.device, host, port, auth=auth
        )
        old = self._links.get(decode_instance)
        self._links[decode_instance] = link
        if old is not None:  # the router replaced it: abort it so its decode receiver stops,
            if self.executing:  # after the batch that may still be sending on it
                self._retired.append(old)
            else:
                old.abort()

    def drop(self, decode_instance: int) -> bool:
        """Abort the link to a decode replica (after the running step); False when none."""
        link = self._links.pop(decode_instance, None)
        if link is None:
            return False
        if self.executing:
            self._retired.append(link)
        else:
            link.abort()
        return True

    def snapshot(self) -> dict[int, KVLink]:
        """A step's links, whatever ``connect`` does meanwhile."""
        return dict(self._links)

    def end_step(self) -> None:
        """The step is over: links retired during it are aborted now."""
        self.executing = False
        retired, self._retired = self._retired, []
        for link in retired:
            link.abort()

    def drop_used(self, used: Mapping[int, KVLink], dests: Iterable[int]) -> None:
        """Abort the links a batch used to ``dests`` (not ones made since to replace them)."""
        for dest in dests:
            if dest not in used:
                continue
            link = used[dest]
            if self._links.get(dest) is link:
                del self._links[dest]
            link.abort()
