"""Serving simulation: requests arrive at a whole model on a modelled system (docs/serving.md).

Modules: ``requests`` (arrival processes, fitted lengths, the arrivals CSV), ``kv`` (KV blocks),
``scheduler`` (one iteration's plan: continuous batching, chunked prefill, preemption), ``engine`` (the
event loop over colocated or prefill/decode replicas), ``cost`` (iteration time and memory: the one
adapter onto :mod:`moesim.train`), ``metrics`` (TTFT, TPOT, throughput, goodput, KV as JSON), ``coe``
(Composition of Experts: whole-model switches as shared-bandwidth transfers on the tier model).
"""
