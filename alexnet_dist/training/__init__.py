"""Training: the per-worker loop, its runners (Ray Train), checkpoints, schedule, evaluation, metric sinks."""
