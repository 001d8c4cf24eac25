"""The serving benchmark client, `pdserve bench`: replay a workload against an OpenAI-compatible
server at a request rate and report TTFT/TPOT/ITL/E2E, SLO attainment and goodput, as
`vllm bench serve` does. `workloads` and `traces` say what to send, `arrivals` when, `load`
sends it and records each request, `metrics` summarizes, `runner` is one run in-process (what
sweeps call) and `cli` the command's flags. Imports no other room, and neither torch nor Ray.
"""
