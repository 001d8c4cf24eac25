"""`pdserve profile`: time the real engine code on this hardware and write the Profile JSON that
`plan` consumes. `grid` says what to measure, `timers` times prefill and decode in-process,
`dist` the TP prefill and KV link across spawned processes, `corun` two workers side by side,
`overheads` the fixed per-request costs through a live deployment; `runner` runs it all and fits
the models, `cli` holds the flags. Builds on `plan` (the models), `sweep` (experiment files) and
`serve` (the client used to measure overheads).
"""
