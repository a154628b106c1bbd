"""Stub iteration costs for engine tests (any object with ``iteration_s(BatchWork)`` serves)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ConstCost:
    """Every iteration takes ``seconds``."""

    seconds: float

    def iteration_s(self, work) -> float:
        return self.seconds

    def ranks_iteration_s(self, works) -> float:
        return self.seconds


@dataclass(frozen=True)
class LinearCost:
    """``base_s + per_token_s * tokens``."""

    base_s: float
    per_token_s: float

    def iteration_s(self, work) -> float:
        return self.base_s + self.per_token_s * work.tokens

    def ranks_iteration_s(self, works) -> float:
        """Lock step: the slowest rank."""
        return max(self.iteration_s(w) for w in works)
