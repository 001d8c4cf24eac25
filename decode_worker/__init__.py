"""The decode pool: the synchronous `DecodeEngine` (blocks, continuous-batching scheduler, local
prefill queue, request table, runner) and the actor around it (KV links and receivers, request
streams, its event loop)."""
