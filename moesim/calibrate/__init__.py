"""Kernel-timing calibration: micro-benchmarks (:mod:`.bench`, needs torch), shape grids (:mod:`.grids`),
held-out validation (:mod:`.validate`) and the end-to-end MoE-layer check (:mod:`.e2e`, needs torch).

Importing this package does not import torch.
"""
