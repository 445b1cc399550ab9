"""Training: the jitted steps and the programs behind them, the optimiser, SMART, the
loop with its checkpoints, preemption and timings, and evaluation on the dev split."""
