"""Evaluation: PQ and AP from per-shard statistics, reduced exactly and in order on the driver."""
