"""`make bench`: ratios measured side by side in one run.

Tabular MLPs:
- DP-SGD step time / plain SGD step time, same model, data and batch size.
- Bytes a node puts on the wire for one round's update / raw parameter bytes.

LoRA on the shipped MiniLM (text classification):
- DP-SGD step time / plain step time.
- Peak RSS of a node process training one DP round / size of the base model's weights.
- Bytes on the wire for one round's update / adapter bytes.

SmolLM2-135M-Instruct with DP-LoRA, instruction tuning (bench/llm.py; out/bench/llm.json):
- DP step time / plain step time, per-example hooks and ghost clipping;
- a node's peak RSS / base weight bytes, logical batch 256 in physical batches of 8 and of 32;
- bytes on the wire per round / adapter bytes;
- the LLM demo's generation accuracy, federated DP (ε = 8) / centralized non-private LoRA.

Privacy-utility curve (bench/utility.py; out/bench/utility.json and utility.png):
- federated DP accuracy / centralized non-private accuracy at ε = 1, 2, 4, 8, mean and spread over
  seeds, for the breast-cancer job and the MiniLM LoRA tweets job (3 in-process nodes), the text
  demo's job deployed (processes, secure aggregation, ε = 8) and the LLM demo's ratio.

Secure aggregation (SecAgg+), 1M-parameter update, n = 5, 10, 25, 50 nodes, 0% and 10% dropout:
- round time with SecAgg+ / plain round time (both include the same local DP-SGD training);
- bytes a node sends per round with SecAgg+ / plain bytes.

Mutual TLS (real processes: a coordinator and 3 nodes):
- the handshake's cost per connection (first RPC on a new channel, TLS - plaintext);
- round time with mutual TLS / plaintext, at the demo's size and with a 1M-parameter update.

Simulation (`fedtrain simulate`, Flower's engine on Ray), N = 10, 100, 1,000 virtual nodes:
- virtual nodes trained per minute in a steady round, and peak memory, each against N = 10;
- the same at N = 100 with Ray reserving 2 CPUs per virtual node (Flower's default) and half a CPU,
  instead of fedtrain's one.

Round overhead (real processes: the demo's job, a coordinator and 3 nodes, mutual TLS; out/bench/overhead.json):
- round wall time - the slowest node's local DP-SGD training, round 1 and rounds 2+, secure aggregation off and on;
- seconds from spawning a node's process to its registration with the coordinator.

Privacy audit (`fedtrain audit`, one run, white-box canaries; out/bench/audit.json):
- the ε lower bound / the claimed ε at ε = 1, 4, 8 on a tabular job (5 audits each) and a MiniLM LoRA job
  (2 audits each), and the audit's run time;
- the bound of the same audit with noise switched off (the most its canaries can show).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.table import Table
from torch.utils.data import TensorDataset

from bench.measure import node_round_rss, step_times, wire_bytes
from fedtrain.console import console
from fedtrain.models import build_model, load_dataset, trainable_state
from fedtrain.models.transformer import resolve_base, weight_files
from fedtrain.spec import JobSpec, parse_job_spec


def spec_for(width: int, hidden: list[int]) -> JobSpec:
    return parse_job_spec({
        "name": "bench", "model": {"kind": "mlp", "hidden": hidden},
        "data": {"features": [f"f{i}" for i in range(width)], "label": "y"},
        "training": {"rounds": 1, "batch_size": 64, "learning_rate": 0.1},
        "privacy": {"epsilon": 3.0},
    })


def tabular() -> None:
    table = Table(title="tabular MLPs")
    for col in ("model", "params", "plain ms/step", "DP ms/step", "DP / plain", "wire bytes / raw bytes"):
        table.add_column(col)
    rng = np.random.default_rng(0)
    for width, hidden in ((30, [32]), (256, [512, 512])):
        spec = spec_for(width, hidden)
        data = TensorDataset(torch.from_numpy(rng.normal(size=(4096, width)).astype(np.float32)),
                             torch.from_numpy(rng.integers(0, 2, 4096)))
        torch.manual_seed(0)
        plain, dp = step_times(spec, data, repeats=3)
        wire, raw = wire_bytes(trainable_state(build_model(spec)))
        params = sum(p.numel() for p in build_model(spec).parameters())
        table.add_row(f"mlp {width}-{'-'.join(map(str, hidden))}-2", f"{params:,}", f"{plain * 1e3:.2f}",
                      f"{dp * 1e3:.2f}", f"{dp / plain:.2f}x", f"{wire / raw:.4f}")
    console.print(table)


def lora() -> None:
    from fedtrain.demos.text import text_spec, write_text_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards, test = write_text_shards(tmp, per_node=256, test_size=64)
        spec = text_spec(test, rounds=1, epsilon=8.0)
        spec = spec.with_training(batch_size=32)
        data = load_dataset(shards[0], spec)
        torch.manual_seed(0)
        plain, dp = step_times(spec, data, repeats=2)
        rss = node_round_rss(spec, shards[0], tmp)
        model_bytes = sum(f.stat().st_size for f in weight_files(resolve_base(spec.model.base)))
        adapter = trainable_state(build_model(spec))
        wire, raw = wire_bytes(adapter)

    table = Table(title=f"LoRA (the text demo's: r={spec.adapter.r} on {', '.join(spec.adapter.target_modules)})"
                        " on MiniLM-L6, 32 tokens, batch 32")
    for col in ("measure", "value", "ratio", "goal"):
        table.add_column(col)
    table.add_row("DP-SGD / plain step time", f"{dp * 1e3:.0f} / {plain * 1e3:.0f} ms", f"{dp / plain:.2f}x", "<= 1.3x")
    table.add_row("node peak RSS / base weights", f"{rss / 2**20:.0f} / {model_bytes / 2**20:.0f} MiB",
                  f"{rss / model_bytes:.2f}x", "")
    table.add_row("wire bytes per round / adapter bytes", f"{wire:,} / {raw:,}", f"{wire / raw:.4f}", "<= 1.05")
    console.print(table)


def llm(with_demo: bool) -> None:
    from bench.llm import run

    result = run(with_demo=with_demo)
    path = Path("out/bench/llm.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    table = Table(title=f"{result['model']} + DP-LoRA (instruction tuning, {result['tokens_per_pair']:.0f} tokens"
                        f" per pair on average), {result['device']}")
    for col in ("measure", "value", "ratio"):
        table.add_column(col)
    for r in result["step_time"]:
        table.add_row(f"DP / plain step time, batch {r['batch']}, {r['grad_sample_mode']}",
                      f"{r['dp_s']:.2f} / {r['plain_s']:.2f} s", f"{r['ratio']:.2f}x")
    for r in result["memory"]:
        table.add_row(f"node peak RSS / base weights, logical {r['logical_batch']}, physical {r['physical_batch']}",
                      f"{r['peak_rss_bytes'] / 2**20:.0f} / {result['base_bytes'] / 2**20:.0f} MiB",
                      f"{r['ratio_to_base']:.2f}x")
    wire = result["wire"]
    table.add_row("wire bytes per round / adapter bytes", f"{wire['bytes']:,} / {wire['adapter_bytes']:,}",
                  f"{wire['ratio']:.4f}")
    if "demo" in result:
        d = result["demo"]
        table.add_row("generation accuracy: federated DP (ε=8) / centralized no DP",
                      f"{d['federated_dp_accuracy']:.3f} / {d['centralized_accuracy']:.3f}"
                      f" (zero-shot {d['zero_shot_accuracy']:.3f})", f"{d['ratio']:.3f}")
    console.print(table)
    console.print(f"results: {path}")


def secure_aggregation() -> None:
    from bench.secagg import run

    rows = run()
    first = rows[0]
    table = Table(title=f"SecAgg+ vs plain round, {first['params']:,}-parameter update, local DP training"
                        f" {first['training_s']:.2f} s (goal at n=50: <= 2x time, <= 1.2x bytes)")
    for col in ("nodes", "dropped", "protocol s: plain / SecAgg+", "round time ratio", "bytes per node ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["nodes"]), str(r["dropped"]),
                      f"{r['plain_protocol_s']:.3f} / {r['secure_protocol_s']:.3f}",
                      f"{r['secure_s'] / r['plain_s']:.2f}x", f"{r['secure_bytes'] / r['plain_bytes']:.4f}x")
    console.print(table)


def transport() -> None:
    from bench.tls import run

    result = run()
    secure, plain = result["handshake_tls_ms"], result["handshake_plain_ms"]
    table = Table(title=f"mutual TLS: a new connection's first answer takes {secure:.2f} ms vs {plain:.2f} ms"
                        f" in plaintext (handshake {secure - plain:.2f} ms, paid once per node connection)")
    for col in ("job, 3 nodes", "secure aggregation", "round s: plaintext / mutual TLS", "round time ratio"):
        table.add_column(col)
    for r in result["rounds"]:
        table.add_row(r["job"], "on" if r["secure_aggregation"] else "off", f"{r['plain_s']:.2f} / {r['tls_s']:.2f}",
                      f"{r['tls_s'] / r['plain_s']:.2f}x")
    console.print(table)


def simulation() -> None:
    from bench.simulate import run

    rows = run()
    base = rows[0]
    table = Table(title="fedtrain simulate: logistic model, 50 rows per node, IID, DP-SGD (ε=3), 3 rounds")
    for col in ("nodes", "CPU per node", "round 1 s", "steady round s", "nodes/min (vs N=10)",
                "peak memory GiB (vs N=10)", "accuracy"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['nodes']:,}", f"{r['cpus_per_node']:g}", f"{r['first_round_s']:.1f}",
                      f"{r['steady_round_s']:.2f}",
                      f"{r['nodes_per_minute']:,.0f} ({r['nodes_per_minute'] / base['nodes_per_minute']:.2f}x)",
                      f"{r['peak_rss_bytes'] / 2**30:.2f} ({r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x)",
                      f"{r['accuracy']:.3f}")
    console.print(table)


def round_overhead() -> None:
    from bench.overhead import run

    result = run()
    path = Path("out/bench/overhead.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))

    def seconds(summary: dict | None, *keys: str) -> str:
        return " / ".join(f"{summary[k]:.3f}" for k in keys) if summary else "n/a"

    goals = result["goals"]
    table = Table(title=f"round overhead: round wall time - slowest node's local DP-SGD training; {result['job']}")
    for col in ("secure aggregation", "round 1 s: overhead (wall)", "rounds 2+ overhead s: median / max",
                "node start -> registered s: min / median / max"):
        table.add_column(col)
    for job in result["jobs"]:
        first = job["round_1_overhead_s"]
        table.add_row("on" if job["secure_aggregation"] else "off",
                      f"{'n/a' if first is None else f'{first:.3f}'} ({job['rounds'][0]['wall_s']:.3f})",
                      seconds(job["steady_overhead_s"], "median", "max"),
                      seconds(job["registration_summary_s"], "min", "median", "max"))
    table.add_row("goal", "", f"< {goals['steady_overhead_s']:g}", f"< {goals['registration_s']:g}")
    console.print(table)
    for job in result["jobs"]:
        if job["note"]:
            console.print(f"secure aggregation {'on' if job['secure_aggregation'] else 'off'}: {job['note']}")
    console.print(f"results: {path}")


def privacy_audit() -> None:
    from bench.audit import run

    result = run()
    path = Path("out/bench/audit.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    table = Table(title="one-run privacy audit (white-box canaries)")
    for col in ("job", "claimed ε", "lower bound: median / max", "median bound / claimed", "right guesses (of each)",
                "VIOLATIONs", "seconds (median)"):
        table.add_column(col, justify="right")
    for a in result["audits"]:
        claimed = "no noise (test-only)" if a["noise_disabled"] else f"{a['claimed_epsilon']:g}"
        bound = a["epsilon_lower_bound"]
        table.add_row(f"{a['job']} ({a['canaries']} canaries)", claimed, f"{bound['median']:.3f} / {bound['max']:.3f}",
                      "-" if a["tightness_median"] is None else f"{a['tightness_median']:.3f}",
                      f"{', '.join(map(str, a['correct_guesses']))} (of {a['guesses']})", str(a["violations"]),
                      f"{a['seconds_median']:.1f}")
    console.print(table)
    console.print(f"results: {path}")


def utility(with_demo: bool) -> None:
    import logging

    from bench.utility import plot, run

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs each in-process round at INFO
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), seeds={"tabular": 3, "minilm": 1}, deployed=with_demo)
    path = Path("out/bench/utility.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    plot(result["entries"], path.with_suffix(".png"))
    table = Table(title="privacy-utility: federated DP accuracy / centralized non-private (3 nodes, δ = 1e-5)")
    for col in ("task", "ε", "DP accuracy", "non-private", "ratio ± spread (seeds)", "std. error", "source"):
        table.add_column(col)
    for e in result["entries"]:
        table.add_row(e["task"], f"{e['epsilon']:g}", f"{e['dp_accuracy']:.3f}", f"{e['nonprivate_accuracy']:.3f}",
                      f"{e['ratio']:.3f} ± {e['spread']:.3f} ({e['seeds']})", f"{e['standard_error']:.3f}",
                      e["source"])
    console.print(table)
    console.print(f"monotone within error: {result['monotone']}; results: {path}, {path.with_suffix('.png')}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-demo", action="store_true",
                        help="skip the federated text and LLM demos (a few minutes, and about 10)")
    parser.add_argument("--only", choices=["tabular", "lora", "llm", "utility", "secagg", "tls", "simulate", "overhead",
                                           "audit"],
                        help="run one group of measurements")
    args = parser.parse_args()
    if args.only in (None, "tabular"):
        tabular()
    if args.only in (None, "lora"):
        lora()
    if args.only in (None, "llm"):
        llm(with_demo=not args.no_demo)
    if args.only in (None, "utility"):  # after llm, whose demo gives SmolLM2's point
        utility(with_demo=not args.no_demo)
    if args.only in (None, "secagg"):
        secure_aggregation()
    if args.only in (None, "tls"):
        transport()
    if args.only in (None, "simulate"):
        simulation()
    if args.only in (None, "overhead"):
        round_overhead()
    if args.only in (None, "audit"):
        privacy_audit()


if __name__ == "__main__":
    main()
