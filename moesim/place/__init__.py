"""Expert placement optimisation: baselines, OR-Tools CP-SAT models, held-out evaluation.

- :mod:`moesim.place.problem`: :class:`PlacementProblem` (loads, inter-layer affinity, capacity) from a trace;
- :mod:`moesim.place.baselines`: contiguous, round-robin, random, greedy (EPLB-spirited) in :data:`BASELINES`;
- :mod:`moesim.place.cpsat`: balance / traffic / joint models (:func:`solve`; as placers in :data:`PLACERS`);
- :mod:`moesim.place.evaluate`: replay of held-out tokens through the simulator.

No file I/O here; the CLI (``moesim place``) reads traces and writes placements.
"""

from moesim.place.baselines import BASELINES, greedy_assignment, replica_counts
from moesim.place.cpsat import OBJECTIVES, PLACERS, SolveReport, solve
from moesim.place.evaluate import affinity_crossings, evaluate
from moesim.place.problem import PlacementProblem, link_costs, min_slots_per_device, problem_from_trace

__all__ = ["BASELINES", "OBJECTIVES", "PLACERS", "PlacementProblem", "SolveReport", "affinity_crossings", "evaluate",
           "greedy_assignment", "link_costs", "min_slots_per_device", "problem_from_trace", "replica_counts", "solve"]
