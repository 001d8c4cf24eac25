"""Goodput sweeps, `pdserve sweep`: for each placement of an experiment (`experiment`, read by
`experiment_loader`, its YAML `schema`), deploy on Ray, warm up, and bisect (`bisection`) the
highest request rate whose SLO attainment meets the target, each probe a real benchmark run
(`probe`, with the latency breakdown of `phase_metrics`); `runner` drives it, `results` and
`plots` write what was measured, `cli` holds the flags. Builds on `serve`; the planner reuses
`bisection`.
"""
