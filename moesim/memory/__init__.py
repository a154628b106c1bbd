"""Three-tier memory, expert offloading/caching inside one MoE model, and model switching for a
Composition of Experts (SambaNova SN40L style). See ``docs/memory.md``.

- :mod:`moesim.memory.tiers`: tiers and a processor-sharing SimPy link model;
- :mod:`moesim.memory.cache`: expert-cache policies (LRU, LFU, pre-gating prefetch, Belady) replayed on traces;
- :mod:`moesim.memory.coe`: request streams over many expert models, switch cost, FIFO/LRU/CP-SAT scheduling;
- :mod:`moesim.memory.sweep`: ``evaluate(config) -> dict`` for capacity/bandwidth sweeps and the Pareto front.
"""
