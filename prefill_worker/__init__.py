"""The prefill pool: one actor per tensor-parallel rank (the leader queues and batches), and the
runner that executes one batch on one rank, sending KV layer by layer during the forward."""
