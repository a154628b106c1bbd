"""Three-tier memory, expert offloading/caching inside one MoE model, and model switching for a
Composition of Experts (SambaNova SN40L style). See ``docs/memory.md``. Values in, values out: no file I/O.

- :mod:`moesim.memory.tiers`: tiers and a processor-sharing SimPy link model; which tier backs a cache;
- :mod:`moesim.memory.cache`: the access stream, cache policies (one protocol, :data:`CACHE_POLICIES`),
  planning and the timed replay;
- :mod:`moesim.memory.evaluator`: the one memory evaluator (:func:`evaluate`: tiers, expert shape and
  policy parameters from a system and a model; :func:`evaluate_placed` for a placement);
- :mod:`moesim.memory.coe`: request streams over many expert models, switch cost, schedulers as plain
  functions in :data:`moesim.memory.coe.SCHEDULERS`;
- :mod:`moesim.memory.sweep`: the price model of a memory hierarchy and the Pareto front (a sweep itself is
  an ``engine = "memory"`` study).
"""

from moesim.memory.evaluator import evaluate, evaluate_placed, offload_setup

__all__ = ["evaluate", "evaluate_placed", "offload_setup"]
