"""The privacy–utility curve: federated DP accuracy / centralized non-private accuracy at
ε = 1, 2, 4, 8 (δ = 1e-5), over a few seeds. Written to out/bench/utility.json (and the
curve to utility.png) by ``python -m bench --only utility``.

Each seed draws its own node shards and held-out set. The federated runs are 3 nodes in
one process (``fedtrain.simulation.run_in_process``: each node's own ``PrivateRound``, the
coordinator's rounds and strategy; no secure aggregation); the baseline trains the same
model on the same rows without DP, with its own tuned optimizer. MiniLM at ε = 8 also runs
as the real deployment: a coordinator and 3 node processes under secure aggregation (the
text demo's job, seed 0). SmolLM2's figure is the LLM demo's from ``--only llm``
(out/bench/llm.json), when that ran first. The tabular job also runs with each server
optimizer (FedAvg, FedAdam, FedYogi, FedAdagrad) at ε = 1 and 8.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import TensorDataset

from fedtrain.console import console
from fedtrain.demos.tabular import standard_error
from fedtrain.models import load_dataset
from fedtrain.simulation import run_in_process
from fedtrain.spec import JobSpec, StrategySpec

EPSILONS = (1.0, 2.0, 4.0, 8.0)
NODES = 3


@dataclass(frozen=True)
class Seeded:
    """One seed's rows and what to run on them."""

    shards: list[TensorDataset]  # each node's rows, as its loader reads them
    test_size: int
    job: Callable[[float], JobSpec]  # the federated DP job at ε
    central: dict  # the non-private baseline's metrics on the same rows
    settings: dict  # what the entry says about its setting


def curve(task: str, seeds: int, prepare: Callable[[Path, int], Seeded], work: Path) -> list[dict]:
    """One entry per ε, over ``seeds`` seeds, each prepared by ``prepare(directory, seed)``."""
    runs: dict[float, list[tuple[float, float]]] = {e: [] for e in EPSILONS}
    for seed in range(seeds):
        directory = work / f"{task}-{seed}"
        directory.mkdir(parents=True)
        seeded = prepare(directory, seed)
        central = seeded.central["accuracy"]
        for epsilon in EPSILONS:
            started = time.monotonic()
            dp = run_in_process(seeded.job(epsilon), seeded.shards)[-1]["accuracy"]
            runs[epsilon].append((dp, central))
            console.print(f"{task} seed {seed} ε={epsilon:g}: federated DP {dp:.3f}, centralized {central:.3f}"
                          f" ({time.monotonic() - started:.0f} s)")
    entries = []
    for epsilon, pairs in runs.items():
        ratios = [dp / central for dp, central in pairs]
        dp, central = statistics.fmean(d for d, _ in pairs), statistics.fmean(c for _, c in pairs)
        entries.append({
            "task": task, "epsilon": epsilon, "dp_accuracy": dp, "nonprivate_accuracy": central,
            "ratio": statistics.fmean(ratios), "seeds": len(pairs),
            "spread": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,  # across seeds
            # Of the mean ratio, from the held-out sets' size alone (binomial).
            "standard_error": math.hypot(standard_error(dp, seeded.test_size),
                                         standard_error(central, seeded.test_size)) / central / math.sqrt(len(pairs)),
            "per_seed": [{"dp_accuracy": d, "nonprivate_accuracy": c} for d, c in pairs],
            "source": "in-process nodes", **seeded.settings,
        })
    return entries


def monotone(entries: list[dict]) -> bool:
    """Whether the ratio never falls as ε grows by more than twice its error (the larger of
    the seeds' spread and the held-out sets' standard error, of either point)."""
    def error(e: dict) -> float:
        return max(e["spread"] / math.sqrt(e["seeds"]), e["standard_error"])
    ordered = sorted(entries, key=lambda e: e["epsilon"])
    return all(b["ratio"] >= a["ratio"] - 2 * math.hypot(error(a), error(b)) for a, b in zip(ordered, ordered[1:]))


def tabular(directory: Path, seed: int) -> Seeded:
    from fedtrain.demos.tabular import centralized_baseline, demo_spec, write_shards

    columns, shards, test = write_shards(directory, NODES, seed=seed)

    def job(epsilon: float) -> JobSpec:
        return demo_spec(columns, test, rounds=5, epsilon=epsilon)
    rows = [load_dataset(p, job(8.0)) for p in shards]
    size = len(load_dataset(test, job(8.0)))
    return Seeded(rows, size, job, centralized_baseline(job(8.0), shards, test),
                  {"nodes": NODES, "rows_per_node": [len(r) for r in rows], "test_examples": size})


def minilm(directory: Path, seed: int) -> Seeded:
    from fedtrain.demos.text import PER_NODE, ROUNDS, TEST_SIZE, centralized_lora, text_spec, write_text_shards

    shards, test = write_text_shards(directory, PER_NODE, TEST_SIZE, seed=seed)

    def job(epsilon: float) -> JobSpec:
        return text_spec(test, ROUNDS, epsilon)
    rows = [load_dataset(p, job(8.0)) for p in shards]
    return Seeded(rows, TEST_SIZE, job, centralized_lora(job(8.0), shards, test),
                  {"nodes": NODES, "rows_per_node": PER_NODE, "test_examples": TEST_SIZE, "rounds": ROUNDS})


def minilm_deployed(work: Path) -> dict:
    """The text demo's job at ε = 8 as deployed: a coordinator and 3 node processes, secure aggregation."""
    from fedtrain.demos.text import run_text_demo

    report = run_text_demo(work / "demo")
    dp, central = report["rounds"][-1]["accuracy"], report["centralized"]["accuracy"]
    size = report["sizes"]["test"]
    return {"task": "minilm", "epsilon": report["job"]["epsilon"], "dp_accuracy": dp, "nonprivate_accuracy": central,
            "ratio": dp / central, "seeds": 1, "spread": 0.0,
            "standard_error": math.hypot(standard_error(dp, size), standard_error(central, size)) / central,
            "source": "processes, secure aggregation", "rows_per_node": report["sizes"]["per_node"],
            "test_examples": size}


def smollm2_from_llm_bench(path: Path = Path("out/bench/llm.json")) -> list[dict]:
    """The LLM demo's ratio at ε = 8, as ``--only llm`` measured it (none if it has not run)."""
    if not path.exists():
        return []
    demo = json.loads(path.read_text()).get("demo")
    if demo is None:
        return []
    dp, central, size = demo["federated_dp_accuracy"], demo["centralized_accuracy"], demo["sizes"]["test_pairs"]
    return [{"task": "smollm2", "epsilon": 8.0, "dp_accuracy": dp, "nonprivate_accuracy": central,
             "ratio": demo["ratio"], "seeds": 1, "spread": 0.0,
             "standard_error": math.hypot(standard_error(dp, size), standard_error(central, size)) / central,
             "source": f"processes, secure aggregation ({path})", "rows_per_node": demo["sizes"]["pairs_per_node"],
             "test_examples": size}]


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task in ("tabular", "minilm"):
        points = sorted((e for e in entries if e["task"] == task and e["source"] == "in-process nodes"),
                        key=lambda e: e["epsilon"])
        ax.errorbar([e["epsilon"] for e in points], [e["ratio"] for e in points],
                    yerr=[max(e["spread"], e["standard_error"]) for e in points], marker="o", capsize=3, label=task)
    for e in entries:
        if e["source"] != "in-process nodes":
            ax.plot([e["epsilon"]], [e["ratio"]], marker="*", markersize=10, linestyle="none",
                    label=f"{e['task']}, deployed (secure aggregation)")
    ax.axhline(0.95, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
    ax.set_xlabel("ε per node (δ = 1e-5)")
    ax.set_ylabel("federated DP accuracy / centralized non-private")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def server_optimizers(work: Path, seeds: int) -> list[dict]:
    """The tabular job's DP accuracy with each server-side strategy (Flower's defaults for its
    server step) at the smallest and largest ε: what a server optimizer does with noisier updates."""
    entries = []
    for strategy in ("fedavg", "fedadam", "fedyogi", "fedadagrad"):
        accuracies: dict[float, list[float]] = {EPSILONS[0]: [], EPSILONS[-1]: []}
        for seed in range(seeds):
            directory = work / f"strategy-{strategy}-{seed}"
            directory.mkdir(parents=True)
            seeded = tabular(directory, seed)
            for epsilon, found in accuracies.items():
                spec = seeded.job(epsilon).model_copy(update={"strategy": StrategySpec(name=strategy)})
                found.append(run_in_process(spec, seeded.shards)[-1]["accuracy"])
        entries += [{"task": "tabular", "strategy": strategy, "epsilon": epsilon, "dp_accuracy": statistics.fmean(a),
                     "spread": statistics.stdev(a) if len(a) > 1 else 0.0, "seeds": len(a)}
                    for epsilon, a in accuracies.items()]
    return entries


def run(work: Path, seeds: dict[str, int], deployed: bool = True) -> dict:
    """Every curve, the deployed MiniLM point and SmolLM2's, with whether each curve is monotone,
    and the server optimizers' effect."""
    entries = curve("tabular", seeds["tabular"], tabular, work) + curve("minilm", seeds["minilm"], minilm, work)
    monotonic = {task: monotone([e for e in entries if e["task"] == task]) for task in seeds}
    if deployed:
        entries.append(minilm_deployed(work))
    entries += smollm2_from_llm_bench()
    return {"entries": entries, "monotone": monotonic, "server_optimizers": server_optimizers(work, seeds["tabular"])}
