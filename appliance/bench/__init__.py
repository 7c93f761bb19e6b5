"""Benchmarks that print figures and save them under bench/results/ (timing goals live here,
never in tests): the training step against TRL and the plain loop (train, sides, trl_side), the
live memory of a step against the planner (memory), on random weights of real shapes (shapes)."""
