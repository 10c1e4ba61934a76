"""The training runtime: one loop for every method (`runtime.run`), the contract a method
implements (`method.py`), accumulation and the optimizer step, ranks, training checkpoints,
metrics and the run's final export. It never names a method: those are `qatune.methods`."""
