"""KV-link and TP stores: bound to one interface, and only holders of the deployment's secret
join (kv_transfer.auth): a stranger on the store is refused and the real peer still joins."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pdserve.engine.parallel import make_process_group
from pdserve.kv_transfer.auth import (
    GroupAuth,
    PeerRefused,
    bound_store,
    handshake,
    join_group,
    verify_group,
)
from pdserve.kv_transfer.descriptor import TransferHeader, TransferItem
from pdserve.kv_transfer.link import RECEIVER, SENDER, KVLink

CPU = torch.device("cpu")
SECRET = b"s" * 32
HOST = "127.0.0.1"


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net lists them) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
                found.append(local.split(":")[0])
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_store_listens_on_the_given_interface_only() -> None:
    store = KVLink.host_store(HOST, timeout_s=10)
    assert _listeners(store.port) == ["0100007F"]  # 127.0.0.1, not 0.0.0.0 or ::


def _run(*targets: Any) -> list[Any]:
    """Run each callable on its own thread; their results or exceptions, in order."""
    out: list[Any] = [None] * len(targets)

    def call(i: int) -> None:
        try:
            out[i] = targets[i]()
        except BaseException as e:  # the test inspects it
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a join hung"
    return out


def _link_pair(
    store: dist.TCPStore, sender_secret: bytes = SECRET, stranger: bool = False, wait_s: float = 20
) -> list[Any]:
    def receiver() -> KVLink:
        return KVLink.connect(
            "l", "gloo", RECEIVER, CPU, HOST, store.port, store, wait_s, GroupAuth(SECRET, True)
        )

    def sender() -> KVLink:
        if stranger:  # comes first: takes a slot it never writes, then proves a wrong secret
            s = dist.TCPStore(HOST, store.port, 2, False, datetime.timedelta(seconds=10))
            s.add("pdserve/auth/seq", 1)
            with pytest.raises(PeerRefused, match="refused this peer"):
                handshake(s, GroupAuth(b"guess" * 7, False), "l", 10)
        auth = GroupAuth(sender_secret, False)
        return KVLink.connect("l", "gloo", SENDER, CPU, HOST, store.port, None, 20, auth)

    return _run(receiver, sender)


def _carries_a_header(rx: KVLink, tx: KVLink) -> None:
    header = TransferHeader((TransferItem(7, "r", 3, (0,)),), 1, "float32", 0, 1, 4, 16, False)
    got = _run(rx.recv_header, lambda: (tx.send_header(header), tx.flush()))[0]
    assert got.items[0].transfer_id == 7


def test_peers_with_the_secret_make_a_working_link() -> None:
    rx, tx = _link_pair(KVLink.host_store(HOST, timeout_s=20))
    _carries_a_header(rx, tx)


def test_a_stranger_on_the_store_is_refused_and_the_peer_still_joins() -> None:
    rx, tx = _link_pair(KVLink.host_store(HOST, timeout_s=20), stranger=True)
    _carries_a_header(rx, tx)  # the real peer was admitted past both of the stranger's slots


def test_a_peer_with_another_secret_fails_at_once_with_a_clear_error() -> None:
    rx, tx = _link_pair(KVLink.host_store(HOST), sender_secret=b"other-deployment" * 2, wait_s=2)
    assert isinstance(tx, PeerRefused) and "another deployment's secret" in str(tx)
    assert isinstance(rx, PeerRefused) and "never proved" in str(rx)  # host: bounded wait


def test_a_group_member_without_the_secret_is_refused_over_the_group() -> None:
    """A stranger who forged the rendezvous (skipping the store handshake) still has to prove
    the secret over the group before any KV moves."""
    store = bound_store(HOST, 2, 20)

    def member(rank: int, secret: bytes) -> None:
        s = store if rank == 0 else dist.TCPStore(HOST, store.port, 2, False)
        pg = make_process_group("gloo", dist.PrefixStore("g", s), rank, 2)
        verify_group(pg, rank, 2, secret, "g", "nonce", CPU)

    out = _run(lambda: member(0, SECRET), lambda: member(1, b"x" * 32))
    assert isinstance(out[0], PeerRefused) and "rank 1" in str(out[0])
    assert isinstance(out[1], PeerRefused)  # the stranger cannot check the real member either


def test_a_tp_group_of_three_admits_every_follower() -> None:
    store = bound_store(HOST, 3, 20)

    def rank(r: int) -> torch.Tensor:
        s = store if r == 0 else dist.TCPStore(HOST, store.port, 3, False)
        auth = GroupAuth(SECRET, hosting=r == 0, peers=2)
        pg = join_group(s, auth, "tp0", "gloo", r, 3, CPU, 20)
        x = torch.ones(2)
        pg.allreduce([x]).wait()
        return x

    sums = _run(*(lambda r=r: rank(r) for r in range(3)))
    assert all(torch.equal(x, torch.full((2,), 3.0)) for x in sums)
