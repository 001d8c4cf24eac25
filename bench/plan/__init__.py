"""The simulator and planner, `pdserve plan`: a hardware `profile_model` (fitted
`latency_model`s plus what they were measured on) drives a discrete-event `simulator` of a
placement (`placement`, instances in `sim_instances`, CPU cores shared per `cpu_share`) serving a
`pdserve bench` workload; `planner` bisects each placement's goodput and ranks them, `compare`
checks the simulator against a real sweep, `cli` holds the flags. Pure Python and numpy: no
torch, no Ray. Builds on `serve` (workloads, metrics) and `sweep` (bisection).
"""
