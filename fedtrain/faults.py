"""Fault injection: the points at which a node or coordinator process can be made to stop,
for the tests of crashes, restarts and dropouts (and for operators rehearsing them).

A process is started with ``FEDTRAIN_FAULT=POINT`` (or given ``Faults(POINT)``); when it
reaches that point it raises :class:`~fedtrain.errors.FaultInjected` (a node) or holds
until it is stopped (the coordinator), exactly as a crash there would leave its state.
Unset, every check is a comparison with "" and nothing else happens. An unknown point is
refused at start, so a typo cannot silently test nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedtrain.errors import FaultInjected, SpecError

ENV = "FEDTRAIN_FAULT"

POINTS = {
    # Node: between charging a round to the ledger and sending it (no spend may be lost).
    "after-ledger-commit": "node",
    # Node, secure aggregation: shares exchanged, no masked update sent.
    "secagg-before-masked": "node",
    # Node, secure aggregation: masked update sent, the unmask stage never answered.
    "secagg-after-masked": "node",
}
# Coordinator: with every result of round N in, just before it checkpoints round N.
HOLD_BEFORE_CHECKPOINT = "before-checkpoint:"


@dataclass(frozen=True)
class Faults:
    """The one fault point a process stops at ("" for none)."""

    point: str = ""

    def __post_init__(self) -> None:
        if self.point and self.point not in POINTS and not _is_hold(self.point):
            known = ", ".join([*POINTS, HOLD_BEFORE_CHECKPOINT + "N"])
            raise SpecError(f"{ENV}={self.point!r} names no fault point; known: {known}")

    @classmethod
    def from_env(cls) -> Faults:
        return cls(os.environ.get(ENV, ""))

    def reach(self, point: str) -> None:
        """Raise FaultInjected if this process was started to stop at ``point``."""
        if point not in POINTS:
            raise ValueError(f"{point!r} is not a fault point")  # a bug in the caller, not an input
        if self.point == point:
            raise FaultInjected(f"fault point {point} reached: stopping")

    def holds_before_checkpoint(self, server_round: int) -> bool:
        return self.point == f"{HOLD_BEFORE_CHECKPOINT}{server_round}"


def _is_hold(point: str) -> bool:
    return point.startswith(HOLD_BEFORE_CHECKPOINT) and point[len(HOLD_BEFORE_CHECKPOINT):].isdigit()
