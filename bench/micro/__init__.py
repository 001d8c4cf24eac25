"""Micro-benchmarks, each run as `python -m pdserve.bench.micro.<name>`: `engine_bench`
(pdserve's prefill and decode against transformers on the same model, timed by
`engine_timers`), `kv_bench` (the KV link against raw torch.distributed), `ttft_bench` (the TTFT
breakdown and HTTP overhead) and `stream_tpot` (TPOT through a deployment). docs/performance.md
holds their results. Imports no other room.
"""
