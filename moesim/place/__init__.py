"""Expert placement optimisation: baselines, OR-Tools CP-SAT models, held-out evaluation.

- :mod:`moesim.place.problem`: :class:`PlacementProblem` (loads, inter-layer affinity, capacity) from a trace;
- :mod:`moesim.place.baselines`: contiguous, round-robin, random, greedy (EPLB-spirited) in :data:`BASELINES`;
- :mod:`moesim.place.eplb`: EPLB-style hierarchical packing (experts onto nodes, replicas inside a node, then GPUs);
- :mod:`moesim.place.objectives`: the objective table (balance / traffic / joint: build, bound, evaluate);
- :mod:`moesim.place.cpsat`: the per-layer CP-SAT models and :func:`solve`;
- :mod:`moesim.place.methods`: every placement method by name (:data:`METHODS`, :func:`get_method`),
  for the CLI and the studies;
- :mod:`moesim.place.evaluate`: replay of held-out tokens through the simulator.

No file I/O here; the CLI (``moesim place``) reads traces and writes placements.
"""

from moesim.place.baselines import BASELINES, greedy_assignment, replica_counts
from moesim.place.cpsat import SolveReport, solve
from moesim.place.evaluate import affinity_crossings, evaluate
from moesim.place.methods import ALIASES, METHODS, Method, get_method
from moesim.place.objectives import OBJECTIVES, STAGES
from moesim.place.problem import PlacementProblem, link_costs, min_slots_per_device, problem_from_trace

__all__ = ["ALIASES", "BASELINES", "METHODS", "OBJECTIVES", "STAGES", "Method", "PlacementProblem", "SolveReport",
           "affinity_crossings", "evaluate", "get_method", "greedy_assignment", "link_costs", "min_slots_per_device",
           "problem_from_trace", "replica_counts", "solve"]
