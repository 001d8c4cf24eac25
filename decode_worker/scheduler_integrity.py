"""The decode scheduler's self-check (`DecodeScheduler.check_integrity`): pure functions that
only read its reservations, seq table and queues and the block manager, and raise
`SchedulerError` (or `BlockManagerError`) where they disagree."""

from __future__ import annotations

from collections.abc import Mapping

from pdserve.decode_worker.seq import DecodeSeq, SchedulerError, SeqStatus
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.speculative import MAX_SPECULATIVE_TOKENS


def check_scheduler(
    blocks: BlockManager,
    max_num_seqs: int,
    reserved: Mapping[int, int],
    seqs: Mapping[int, DecodeSeq],
    running: list[DecodeSeq],
    ready: list[DecodeSeq],
    preempted: list[DecodeSeq],
) -> None:
    """Raise if the queues (``running``, ``ready``, ``preempted``), the seq table ``seqs``
    (every activated seq), the reservations ``reserved`` (seq id -> prompt tokens) and the
    blocks disagree."""
    blocks.check_integrity()
    queues = (
        (SeqStatus.RUNNING, running),
        (SeqStatus.READY, ready),
        (SeqStatus.PREEMPTED, preempted),
    )
    queued = [seq for _, queue in queues for seq in queue]
    if sorted(s.seq_id for s in queued) != sorted(seqs):
        raise SchedulerError("queues and the seq table disagree (a seq is lost or doubled)")
    if reserved.keys() & seqs.keys():
        raise SchedulerError("a seq is both reserved and activated")
    holders = set(reserved) | {s.seq_id for s in running + ready}
    if set(blocks.owners()) != holders:
        raise SchedulerError(
            f"block owners {sorted(blocks.owners())} != seqs holding blocks {sorted(holders)}"
        )
    if len(running) > max_num_seqs:
        raise SchedulerError(f"{len(running)} running > max_num_seqs")
    for seq_id, tokens in reserved.items():
        if blocks.num_tokens(seq_id) != tokens:
            raise SchedulerError(f"reserved seq {seq_id} lost its prompt blocks")
    for status, queue in queues:
        for seq in queue:
            check_seq(blocks, seqs, seq, status)
    arrivals = [s.arrival for s in preempted]
    if arrivals != sorted(arrivals):
        raise SchedulerError("the preempted queue is out of arrival order")


def check_seq(
    blocks: BlockManager, seqs: Mapping[int, DecodeSeq], seq: DecodeSeq, status: SeqStatus
) -> None:
    """Raise if ``seq``, found in the ``status`` queue, has another status, is not the one
    ``seqs`` knows by its id, or caches a number of tokens its blocks do not match."""
    if seq.status is not status or seqs.get(seq.seq_id) is not seq:
        raise SchedulerError(f"seq {seq.seq_id} is {seq.status.value} in the {status.value} queue")
    if status is SeqStatus.PREEMPTED:
        ok = seq.num_cached == 0
    else:
        # ready: capacity == cached; running: more while a decode step is scheduled (one,
        # plus its drafts' slots)
        spare = blocks.num_tokens(seq.seq_id) - seq.num_cached
        most = 1 + MAX_SPECULATIVE_TOKENS
        ok = spare == 0 if status is SeqStatus.READY else 0 <= spare <= most
        ok = ok and seq.num_cached <= len(seq.token_ids)
    if not ok:
        raise SchedulerError(
            f"seq {seq.seq_id} ({seq.status.value}) caches {seq.num_cached} of "
            f"{len(seq.token_ids)} tokens, which its blocks do not match"
        )
