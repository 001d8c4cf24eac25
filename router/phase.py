"""Where a request is on its way through the router (``Router.phase`` reports it)."""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """A request's phase; it decides what an exit must free.

    ::

        RESERVED ──▶ PREFILL ──first token──▶ DECODE ──finish/error delta──▶ DONE
                        └──raised──▶ PREFILL_FAILED

    RESERVED: decode blocks held, prefill not dispatched (links being made). PREFILL: queued,
    computing or sending its KV (an exit asks the prefill side first; KV may still land).
    PREFILL_FAILED: the prefill side raised and sends nothing more. DECODE: decode owns it
    (colocated requests start here). DONE: decode has freed it; nothing left to abort.
    """

    RESERVED = "reserved"
    PREFILL = "prefill"
    PREFILL_FAILED = "prefill-failed"
    DECODE = "decode"
    DONE = "done"
