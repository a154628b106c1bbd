"""Expert caching inside one MoE model: HBM holds a subset of experts, the rest live in a lower tier.

Split by stage; this package re-exports the public names:

- :mod:`~moesim.memory.cache.stream`: the access stream of a trace (:func:`access_stream`);
- :mod:`~moesim.memory.cache.policies`: the :class:`CachePolicy` protocol and :data:`CACHE_POLICIES`
  (LRU, LFU, pre-gating prefetch, affinity prefetch, Belady);
- :mod:`~moesim.memory.cache.planning`: :func:`plan` (hits, misses, prefetches of one policy);
- :mod:`~moesim.memory.cache.timed`: :func:`replay_timed` (a plan played in SimPy: fetches over the
  shared link, stall = time compute waits for weights).
"""

from moesim.memory.cache.planning import (CachePlan, first_use_plan, from_group, no_cache_plan, plan,
                                          plan_exact)
from moesim.memory.cache.policies import (CACHE_POLICIES, AffinityPrefetch, Belady, CachePolicy,
                                          CachePolicyFactory, LFU, LRU, PreGating, learn_affinity)
from moesim.memory.cache.stream import AccessStream, access_stream, select_accesses, stream_from_keys
from moesim.memory.cache.timed import ExpertShape, TimedResult, cache_capacity_experts, replay_timed

__all__ = ["AccessStream", "AffinityPrefetch", "Belady", "CACHE_POLICIES", "CachePlan", "CachePolicy",
           "CachePolicyFactory", "ExpertShape", "LFU", "LRU", "PreGating", "TimedResult", "access_stream",
           "cache_capacity_experts", "first_use_plan", "from_group", "learn_affinity", "no_cache_plan", "plan",
           "plan_exact", "replay_timed", "select_accesses", "stream_from_keys"]
