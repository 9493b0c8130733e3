"""Opt-in, process-level extras (the CPU allocator knob). Not imported by ``import tmcgraph``."""

__all__ = ["allocator"]
