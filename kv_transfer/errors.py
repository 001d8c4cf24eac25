"""Errors of the KV transfer path that other packages catch (no torch: the router imports them)."""

from __future__ import annotations


class KVLinkError(RuntimeError):
    """The KV link from a prefill rank to decode replica ``decode_instance`` failed (the replica
    died or the link was torn down); the request's KV never fully arrived."""

    def __init__(self, decode_instance: int, message: str) -> None:
        super().__init__(decode_instance, message)  # both in args: the error crosses Ray intact
        self.decode_instance = decode_instance
        self.message = message

    def __str__(self) -> str:
        return self.message
