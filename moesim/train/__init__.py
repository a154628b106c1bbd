"""The training step of a whole transformer (dense or MoE) on a modelled system.

Values in, values out: :func:`moesim.train.step.simulate_step` takes a
:class:`workloads.hf_config.ModelConfig`, a :class:`hwmodels.specs.System`, a
:class:`moesim.train.spec.TrainSpec` and a :class:`hwmodels.roofline.CostModel` and returns a
:class:`moesim.train.step.TrainResult`. No file I/O, no globals.

Modules: ``spec`` (parallel layout and step options), ``ops`` (timing of one operator through the cost
model, forward and backward), ``collectives`` (ring/point-to-point collectives on the topology),
``layers`` (the operators of one transformer block and the embeddings/head), ``moe`` (the MoE part,
through the MoE-layer cost path of :mod:`moesim.analytic`), ``pipeline`` (1F1B, interleaved and
DualPipe-style schedules), ``overlap`` (gradient reduction, weight gathers and TP collectives beside compute),
``memory`` (bytes per device), ``step`` (puts them together).
"""
