"""Flax NNX modules."""
