"""A job's report for the consortium: ``report.json`` and a self-contained ``report.html``.

Built from the job's status alone (what the coordinator stores), so that it holds
nothing a node did not send: global evaluation per round, each node's ε after each
round against the job's ε, who took part in each round, and the bytes received.
The page has its plots inline (SVG) and no script: it opens offline, anywhere.
"""

from __future__ import annotations

import html
import io
import json
from itertools import cycle
from pathlib import Path

from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_values
from fedtrain.spec import job_spec_from_json

REPORT_JSON, REPORT_HTML = "report.json", "report.html"


def job_report(status: pb.JobStatus, audit: dict | None = None, examples: list[dict[str, str]] | None = None
               ) -> dict:
    """The report's content, as plain JSON-able data; ``audit``, the job's privacy audit
    (``fedtrain.audit.AuditResult`` as a dict), if one was run; ``examples``, what an
    instruction-tuned model answers to evaluation prompts before and after
    (``fedtrain.models.transformer.answer_examples``)."""
    spec = job_spec_from_json(status.spec_json)

    def node_entry(decision: str = "", reason: str = "") -> dict:
        return {"decision": decision, "reason": reason, "epsilon": {}, "rounds": []}

    nodes = {n.name: node_entry(n.decision, n.reason) for n in status.nodes}
    rounds = []
    for r in status.rounds:
        entry = {"round": r.round, "metrics": dict(r.metrics), "wall_seconds": r.wall_seconds,
                 "bytes_received": sum(n.bytes_received for n in r.nodes), "nodes_ok": [], "nodes_refused": {}}
        for n in r.nodes:
            node = nodes.setdefault(n.name, node_entry())
            if n.refusal:
                entry["nodes_refused"][n.name] = n.refusal
                continue
            entry["nodes_ok"].append(n.name)
            node["rounds"].append(r.round)
            epsilon = decode_values(n.metrics).get("epsilon")
            if isinstance(epsilon, float):
                node["epsilon"][r.round] = epsilon
        rounds.append(entry)
    return {
        "job": {"id": status.job_id, "name": status.name, "state": status.state, "error": status.error,
                "spec_sha256": spec.digest(), "task": spec.task, "model": spec.model.kind,
                "strategy": spec.strategy.name, "secure_aggregation": spec.secagg is not None,
                "rounds": spec.training.rounds, "min_nodes": spec.min_nodes,
                "epsilon": spec.privacy.epsilon, "delta": spec.privacy.delta,
                # Not in round 1's wall_seconds: the wait for nodes to accept, owners' approvals included.
                "approval_wait_seconds": status.approval_wait_seconds},
        "rounds": rounds,
        "nodes": nodes,
        "audit": audit,
        "examples": examples or [],
    }


def _laid_out(fig):
    """``fig`` with whole rounds on its round axes, laid out as it is drawn."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or doctype


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def evaluation_figure(report: dict):
    plt = _pyplot()
    rounds = report["rounds"]
    keys = sorted({k for r in rounds for k in r["metrics"]})
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["round"] for r in rounds], [r["metrics"].get(key, float("nan")) for r in rounds], marker="o")
        ax.set_xlabel("round")
        ax.set_title(key)
    if not keys:
        axes[0][0].text(0.5, 0.5, "no evaluation data in the job", ha="center", va="center")
    return _laid_out(fig)


def _names(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, …, {names[-1]} ({len(names)} nodes)"


def privacy_figure(report: dict):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    # Nodes of the same size spend the same ε each round, and their lines would hide one
    # another: one line for each distinct series, labelled with every node on it; and a
    # marker and line style of its own for each, for series that nearly coincide.
    series: dict[tuple, list[str]] = {}
    for name, node in sorted(report["nodes"].items()):
        points = tuple(sorted((int(r), round(e, 6)) for r, e in node["epsilon"].items()))
        if points:
            series.setdefault(points, []).append(name)
    styles = cycle([(m, ls) for ls in ("-", "--", ":", "-.") for m in "os^Dv"])
    for (points, names), (marker, linestyle) in zip(series.items(), styles):
        ax.plot([r for r, _ in points], [e for _, e in points], marker=marker, linestyle=linestyle,
                label=_names(names))
    ax.axhline(report["job"]["epsilon"], color="gray", linestyle="--", label="job's ε")
    ax.set_xlabel("round")
    ax.set_ylabel(f"ε (δ={report['job']['delta']:g})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the lines, never on them
    return _laid_out(fig)


def participation_figure(report: dict):
    plt = _pyplot()
    trained = [r for r in report["rounds"] if r["round"]]
    min_nodes = report["job"]["min_nodes"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    tx = [r["round"] for r in trained]
    ok = [len(r["nodes_ok"]) for r in trained]
    refused = [len(r["nodes_refused"]) for r in trained]
    axes[0].bar(tx, ok, label="results")
    axes[0].bar(tx, refused, bottom=ok, label="refused or rejected")
    axes[0].axhline(min_nodes, color="gray", linestyle="--", label="min_nodes")
    # Room above the tallest bar and the min_nodes line, which would otherwise sit on the frame.
    axes[0].set_ylim(0, max([min_nodes, *(a + b for a, b in zip(ok, refused))]) + 1)
    axes[0].yaxis.get_major_locator().set_params(integer=True)  # whole nodes
    axes[0].set_title("nodes per round")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize="small")  # below the bars
    axes[1].bar(tx, [r["bytes_received"] / 1024 for r in trained])
    axes[1].set_title("KiB received per round")
    for ax in axes:
        ax.set_xlabel("round")
    return _laid_out(fig)


def _figures(report: dict) -> list[tuple[str, str]]:
    return [("Global model on the coordinator's evaluation data", _svg(evaluation_figure(report))),
            ("Privacy spent per node, against the job's ε", _svg(privacy_figure(report))),
            ("Participation and traffic", _svg(participation_figure(report)))]


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict) -> str:
    job = report["job"]
    summary = _table(["job", "state", "task / model", "strategy", "secure aggregation", "rounds", "ε, δ per node",
                      "seconds waiting for nodes to accept (before round 1)"], [[
        f"{job['id']} ({job['name']})", job["state"], f"{job['task']} / {job['model']}", job["strategy"],
        "on" if job["secure_aggregation"] else "off", str(job["rounds"]), f"{job['epsilon']:g}, {job['delta']:g}",
        f"{job['approval_wait_seconds']:.1f}",
    ]])
    keys = sorted({k for r in report["rounds"] for k in r["metrics"]})
    per_round = _table(["round", *keys, "nodes ok", "refused", "KiB received", "seconds"], [
        [str(r["round"]), *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys),
         ", ".join(r["nodes_ok"]), "; ".join(f"{n}: {why}" for n, why in r["nodes_refused"].items()),
         f"{r['bytes_received'] / 1024:.1f}", f"{r['wall_seconds']:.1f}"]
        for r in report["rounds"]
    ])
    per_node = _table(["node", "decision", "rounds contributed", "ε after its last round"], [
        [name, n["decision"] or "-", ", ".join(map(str, n["rounds"])) or "none",
         f"{n['epsilon'][max(n['epsilon'], key=int)]:.4f}" if n["epsilon"] else "-"]
        for name, n in sorted(report["nodes"].items())
    ])
    audit = report.get("audit")
    audited = "" if audit is None else "<h2>Privacy audit</h2>" + _table(
        ["claimed ε (accountant)", "ε lower bound (one-run audit)", "verdict", "canaries", "right guesses",
         "confidence", "score"],
        [[f"{audit['claimed_epsilon']:g}", f"{audit['epsilon_lower_bound']:.3f}", audit["verdict"],
          str(audit["canaries"]), f"{audit['correct_guesses']} of {audit['guesses']}", f"{audit['confidence']:g}",
          audit["score"]]]) + ("<p>The job's pipeline, run by the coordinator on its own evaluation table with"
                               " canaries in one node's share: a bound above the claimed ε would mean the"
                               " pipeline leaks more than it claims.</p>")
    answers = "" if not report["examples"] else "<h2>Answers before and after</h2>" + _table(
        ["prompt (evaluation data)", "expected", "before fine-tuning", "after"],
        [[e["prompt"], e["expected"], e["before"], e["after"]] for e in report["examples"]])
    figures = "".join(f"<figure><figcaption>{html.escape(title)}</figcaption>{svg}</figure>"
                      for title, svg in _figures(report))
    error = f"<p class=error>{html.escape(job['error'])}</p>" if job["error"] else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedtrain job {html.escape(job['id'])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
figure {{ margin: 1.5em 0; }} figcaption {{ font-weight: bold; }} .error {{ color: #a40; }}
svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>Job {html.escape(job['id'])}: {html.escape(job['name'])}</h1>
{summary}{error}
<p>spec sha256 <code>{job['spec_sha256']}</code>. Everything here is what the coordinator received:
DP-protected updates (or their secure sum), the DP parameters and ε each node reported, and the
evaluation of the global model on the coordinator's own data.</p>
{audited}{answers}{figures}
<h2>Rounds</h2>{per_round}
<h2>Nodes</h2>{per_node}
</body></html>
"""


def write_report(status: pb.JobStatus, out: Path, audit: dict | None = None,
                 examples: list[dict[str, str]] | None = None) -> Path:
    """Write report.json and report.html for ``status`` (and its ``audit``) into ``out``;
    returns the HTML's path."""
    out.mkdir(parents=True, exist_ok=True)
    report = job_report(status, audit, examples)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2))
    page = out / REPORT_HTML
    page.write_text(render_html(report), encoding="utf-8")
    return page
