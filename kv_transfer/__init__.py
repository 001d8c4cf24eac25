"""Moving KV caches from prefill ranks to decode replicas over torch.distributed: the link (a
private 2-rank group), the decode-side receiver thread, the msgpack header/trailer protocol and
the wire's block layout. Imports no role package."""
