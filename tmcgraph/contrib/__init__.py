"""Opt-in extras: the CPU allocator knob and safe checkpoints. Not imported by ``import tmcgraph``."""

__all__ = ["allocator", "checkpoint"]
