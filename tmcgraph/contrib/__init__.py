"""Opt-in extras: the CPU allocator and thread-count knobs and safe checkpoints. Not imported by ``import tmcgraph``."""

__all__ = ["allocator", "checkpoint", "threads"]
