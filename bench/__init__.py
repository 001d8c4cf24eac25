"""Benchmarks, a room per product. Each room's `__init__` says what lives there.

- `serve/`: the serving benchmark client, `pdserve bench` (workloads, traces, arrivals, the
  async load generator, metrics and goodput).
- `sweep/`: goodput sweeps, `pdserve sweep` (experiment files, probes, rate bisection, results
  and plots).
- `plan/`: the simulator and planner, `pdserve plan` (the Profile JSON model, latency models,
  placements, CPU sharing, the discrete-event simulator, the comparison against a sweep).
- `profile/`: `pdserve profile`, which measures this hardware and writes the Profile the
  planner consumes.
- `micro/`: micro-benchmarks run as `python -m pdserve.bench.micro.<name>` (engine, KV link,
  TTFT, streamed TPOT).

Shared by several rooms: `models` (the benchmark checkpoints) and `machine` (host facts).
Rooms import one way only: serve <- sweep <- plan <- profile; micro stands apart. Nothing here
imports the command line (`pdserve.cluster.cli`), which imports these rooms lazily.
"""
