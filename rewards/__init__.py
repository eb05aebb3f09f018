"""Reward scorers for multi-turn trajectories, kept independent of the trainer's internals."""
