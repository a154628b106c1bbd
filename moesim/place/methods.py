"""Placement methods by name: the one registry behind ``moesim place``, ``moesim simulate --placement``
and the studies' ``placement`` parameter.

A method is a baseline placer (:data:`moesim.place.baselines.BASELINES`, ``(problem, rng) -> Placement``)
or a CP-SAT objective (:data:`moesim.place.objectives.OBJECTIVES`, solved by :func:`moesim.place.cpsat.solve`).
:data:`ALIASES` keeps names that shipped studies and their results use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.place.baselines import BASELINES, Placer
from moesim.place.cpsat import SolveReport, solve
from moesim.place.eplb import eplb_hierarchical
from moesim.place.objectives import OBJECTIVES
from moesim.place.problem import PlacementProblem
from moesim.placement import Placement

STUDY_TIME_LIMIT_S = 10.0  # studies solve one problem per configuration: 10 (deterministic) units each keeps a grid short
SEED_BOUND = 2**31 - 1  # CP-SAT's random_seed is a signed 32-bit integer


@dataclass(frozen=True)
class Method:
    """A placement method: exactly one of ``placer`` (a baseline) or ``objective`` (CP-SAT) is set."""

    name: str
    placer: Placer | None = None
    objective: str | None = None

    @property
    def needs_affinity(self) -> bool:
        """True when the method reads ``problem.affinity`` (an objective with a coupled stage)."""
        return self.objective is not None and any(s.coupled for s in OBJECTIVES[self.objective])

    def place(self, problem: PlacementProblem, rng: np.random.Generator,
              **solve_kw) -> tuple[Placement, SolveReport | None]:
        """The placement (and the solver report for CP-SAT methods; ``solve_kw`` go to :func:`solve`)."""
        if self.placer is not None:
            return self.placer(problem, rng), None
        return solve(problem, self.objective, **solve_kw)

    def study_placer(self, problem: PlacementProblem, rng: np.random.Generator) -> Placement:
        """As a plain placer for studies: CP-SAT runs deterministic, :data:`STUDY_TIME_LIMIT_S`, seed from ``rng``."""
        if self.placer is not None:
            return self.placer(problem, rng)
        placement, _ = solve(problem, self.objective, time_limit_s=STUDY_TIME_LIMIT_S,
                             seed=int(rng.integers(SEED_BOUND)), deterministic=True)
        return placement


METHODS: dict[str, Method] = {
    **{name: Method(name, placer=placer) for name, placer in BASELINES.items()},
    "eplb-hier": Method("eplb-hier", placer=eplb_hierarchical),  # node-then-GPU EPLB-style greedy (moesim.place.eplb)
    **{name: Method(name, objective=name) for name in OBJECTIVES},
}

#: old name -> method name (studies/placement_vs_scale and its results say ``cpsat-balance``)
ALIASES: dict[str, str] = {"cpsat-balance": "balance"}


def get_method(name: str) -> Method:
    """The method called ``name`` (or an alias); ValueError naming the known methods otherwise."""
    method = METHODS.get(ALIASES.get(name, name))
    if method is None:
        raise ValueError(f"unknown placement method {name!r}; known: {', '.join(METHODS)} "
                         f"(aliases: {', '.join(f'{a} = {m}' for a, m in ALIASES.items())})")
    return method
