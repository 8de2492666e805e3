"""``fedtrain audit``: measure a job's privacy with one training run (Steinke, Nasr and
Jagielski 2023; the bound is :func:`fedtrain.privacy.one_run.epsilon_lower_bound`).

An operator-side tool that runs both sides in-process, like the simulation: the table is
split IID over ``nodes`` nodes, node 0 also holds each of ``m`` canaries with probability
1/2, every node trains with the node's own ``PrivateRound`` and the rounds aggregate with
the coordinator's own strategy and loop over a small in-process grid. The auditor then
scores each canary, guesses "in" for the highest scores and "out" for the lowest, and
turns the number of right guesses into an ε that the run refutes at 95% confidence. A
bound above the claimed ε means the training is not as private as it says: a bug.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel
from torch.utils.data import TensorDataset

from fedtrain.audit import canaries as canary_lib
from fedtrain.data import DataCheck, read_arrow, write_arrow
from fedtrain.errors import SpecError
from fedtrain.node.dp_sgd import LocalUpdate
from fedtrain.node.round import PrivateRound
from fedtrain.privacy.accounting import RoundPlan
from fedtrain.privacy.one_run import epsilon_lower_bound
from fedtrain.simulation import LocalGrid, play_the_server
from fedtrain.spec import JobSpec

CONFIDENCE = 0.95


class AuditResult(BaseModel):
    job: str
    claimed_epsilon: float
    epsilon_lower_bound: float
    delta: float
    confidence: float = CONFIDENCE
    canaries: int
    guesses: int
    correct_guesses: int
    verdict: Literal["consistent", "VIOLATION"]
    score: Literal["white-box", "black-box"]
    nodes: int
    rounds: int
    noise_disabled: bool = False  # the test-only switch: never a claim about the job
    seconds: float


def default_guesses(m: int) -> int:
    """How many canaries the auditor guesses on, fixed from ``m`` alone, before any score is
    seen: choosing r after looking at the scores (e.g. where they look most separated) would
    be a search over r, and the bound holds for one r chosen in advance. Half the canaries
    (at least 10) trades a wider tail (more guesses, more power) against weaker scores."""
    r = min(m, max(10, m // 2))
    return r - r % 2


class _AuditGrid(LocalGrid):
    """The nodes of the audit (see ``LocalGrid``), keeping what the white-box score needs.

    Each round it keeps node 0's update and two references: node 0's round run again from
    the same start on its real rows alone, once without noise and once with it, as the node
    would run it. Update minus the noise-free reference is the canaries'
    pull plus the noise: the real data's pull on each canary's column, which would drown the
    canaries, cancels. The noisy reference minus the noise-free one is a fresh draw of the
    node's noise: an honest node's noise is independent of it, but a node whose noise repeats
    (a fixed seed) gives the same draw again, and the score subtracts what of it the update
    holds (see ``canaries.white_box_scores``). Neither reference depends on a canary bit, so
    using them is post-processing and the bound stays valid."""

    def __init__(self, spec: JobSpec, datasets: list[TensorDataset], real0: TensorDataset, declared: list[int],
                 disable_noise: bool):
        super().__init__(spec, datasets, declared)
        self.real0 = real0
        self.rounds: list[canary_lib.Observed] = []
        if disable_noise:  # test-only: the plan is the spec's but with σ = 0 (no DP at all)
            for p in self.private:
                p.plan = _noiseless(p.plan)
        self.noisy_reference = PrivateRound(spec, declared[0])
        self.reference = PrivateRound(spec, declared[0])
        self.reference.plan = _noiseless(self.reference.plan)

    def trained(self, node: int, start: dict[str, np.ndarray], update: LocalUpdate) -> None:
        if node == 0:
            self.rounds.append(canary_lib.Observed(
                start=start, update=update.arrays, reference=self.reference.train(self.real0, start).arrays,
                noisy_reference=self.noisy_reference.train(self.real0, start).arrays,
                noise_multiplier=self.private[0].plan.noise_multiplier))


def _noiseless(plan: RoundPlan) -> RoundPlan:
    return dataclasses.replace(plan, noise_multiplier=0.0)


def run_audit(spec: JobSpec, table: Path, *, nodes: int = 3, canaries: int, guesses: int | None = None,
              white_box: bool = True, seed: int | None = None, disable_noise: bool = False) -> AuditResult:
    """Train ``spec`` once on ``table`` split over ``nodes`` nodes, node 0 holding a random half
    of ``canaries`` canaries, and bound ε from below by how well the canaries' membership is guessed.

    ``white_box``: score by node 0's own updates (what the coordinator sees of it in the
    clear); otherwise by the final global model's loss on each canary (what anyone with the
    model sees). ``seed`` makes the canary bits and the split reproducible (the DP noise
    stays unpredictable); ``disable_noise`` trains without noise, for tests of the audit
    itself: it exists only here, never in a spec or on the wire."""
    from fedtrain.models import build_model, initial_state, load_dataset, load_trainable_state
    from fedtrain.server.rounds import run_rounds
    from fedtrain.server.strategy import build_strategy

    started = time.monotonic()
    if nodes < max(1, spec.min_nodes):
        raise SpecError(f"the job needs min_nodes={spec.min_nodes} per round; audit with at least that many nodes")
    r = default_guesses(canaries) if guesses is None else guesses
    if not (0 < r <= canaries and r % 2 == 0):
        raise SpecError(f"guesses must be even and in 2..{canaries}, not {r}")
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    candidates = canary_lib.canary_table(spec, canaries, rng)
    inside = rng.random(canaries) < 0.5

    # Each node reads its own rows from its own file with the node's loader, as a node does,
    # so that what a node's preprocessing does with its rows (and a canary among them) is
    # audited too; node 0's real rows alone, read the same way, are the references' data.
    rows = read_arrow(Path(table)).select(candidates.column_names).cast(candidates.schema)
    parts = np.array_split(rng.permutation(len(rows)), nodes)
    with tempfile.TemporaryDirectory(prefix="fedtrain-audit-") as tmp:
        def node_data(name: str, part: pa.Table) -> TensorDataset:
            path = Path(tmp) / f"{name}.csv"
            write_arrow(part, path)
            return load_dataset(path, spec, DataCheck())

        datasets = [node_data(f"node{i}", rows.take(p)) for i, p in enumerate(parts)]
        real0 = datasets[0]
        datasets[0] = node_data("node0-canaries", pa.concat_tables([rows.take(parts[0]),
                                                                     candidates.filter(pa.array(inside))]))
        canary_data = node_data("canaries", candidates)
    # Node 0 declares its rows plus half the canaries: a declared size (the policy's) must not
    # depend on which canaries are in, or the plan itself would tell their count.
    declared = [len(p) for p in parts]
    declared[0] += canaries // 2

    play_the_server()
    grid = _AuditGrid(spec, datasets, real0, declared, disable_noise)
    final: dict[str, np.ndarray] = {}

    def keep(server_round: int, weights: dict[str, np.ndarray], given_up: str) -> None:
        final.update(weights)

    run_rounds(build_strategy(spec), grid, spec, initial_state(spec), 1, keep)

    if white_box:
        scores = sum(canary_lib.white_box_scores(spec, observed, canary_data) for observed in grid.rounds)
    else:
        model = build_model(spec)
        load_trainable_state(model, final)
        scores = canary_lib.black_box_scores(model, spec, canary_data)

    # Guess "in" for the r/2 highest scores, "out" for the r/2 lowest; ties broken at random.
    order = np.lexsort((rng.random(canaries), scores))
    low, high = order[: r // 2], order[canaries - r // 2:]
    correct = int(inside[high].sum() + (~inside[low]).sum())
    bound = epsilon_lower_bound(canaries, r, correct, spec.privacy.delta, CONFIDENCE)
    return AuditResult(
        job=spec.name, claimed_epsilon=spec.privacy.epsilon, epsilon_lower_bound=bound, delta=spec.privacy.delta,
        canaries=canaries, guesses=r, correct_guesses=correct,
        verdict="consistent" if bound <= spec.privacy.epsilon else "VIOLATION",
        score="white-box" if white_box else "black-box", nodes=nodes, rounds=spec.training.rounds,
        noise_disabled=disable_noise, seconds=time.monotonic() - started)
