"""Every job ends with a report the consortium can read: JSON, and an HTML page checked in Chromium."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_spec

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium on a machine with no network: no background connections, no sandbox (tests run as root).
CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def finished(client, job_id, timeout=180):
    deadline = time.monotonic() + timeout
    while (status := client.status(job_id)).state not in ("finished", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    return status


def test_a_finished_job_has_a_report_that_a_browser_shows(consortium):
    start, client = consortium
    start(3)
    spec = make_spec(min_nodes=3, training={"rounds": 2})
    job_id = client.submit(spec)
    status = finished(client, job_id)
    assert status.state == "finished", status.error
    page = Path(status.report_path)
    assert page.name == "report.html" and page.parent.name == job_id

    report = json.loads((page.parent / "report.json").read_text())
    assert report["job"]["secure_aggregation"] and report["job"]["epsilon"] == 1.0
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert all(sorted(r["nodes_ok"]) == ["n0", "n1", "n2"] and r["bytes_received"] > 0 for r in report["rounds"][1:])
    for name in ("n0", "n1", "n2"):
        eps = report["nodes"][name]["epsilon"]
        assert 0 < eps["1"] < eps["2"] <= 1.0 + 1e-6  # spent per round, within the job's ε

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page()
        problems = []
        tab.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        tab.on("pageerror", lambda e: problems.append(str(e)))
        tab.on("requestfailed", lambda r: problems.append(f"{r.url}: {r.failure}"))
        tab.goto(page.as_uri())
        tab.wait_for_load_state("load")
        assert job_id in tab.title()
        sizes = tab.eval_on_selector_all(
            "figure svg", "els => els.map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height])")
        captions = tab.eval_on_selector_all("figcaption", "els => els.map(e => e.textContent)")
        browser.close()
    assert problems == []
    assert len(sizes) == 3 and all(w > 200 and h > 100 for w, h in sizes), sizes
    assert captions[1] == "Privacy spent per node, against the job's ε"


def test_the_cli_prints_the_report_path_or_says_why_there_is_none(consortium, consortium_pki, tmp_path):
    start, client = consortium
    consortium_pki.identity("operator", "operator")  # the consortium's operator certificate, in its directory
    args = [sys.executable, "-m", "fedtrain", "job", "report", "--coordinator", client.address,
            "--tls-dir", str(consortium_pki.root / "operator" / "operator")]
    job_id = client.submit(make_spec(min_nodes=2))  # no node ever joins: the job waits
    out = subprocess.run([*args, job_id], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"job {job_id} has no report yet (waiting)" in out.stderr
    start(2)
    status = finished(client, job_id)
    out = subprocess.run([*args, job_id], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == status.report_path


def report_of(epsilon: dict[str, dict[int, float]], ok: list[int], refused: list[int], min_nodes: int) -> dict:
    """A report (``job_report``'s shape) of rounds 1.. with these counts and each node's ε per round."""
    rounds = [{"round": r, "metrics": {}, "wall_seconds": 1.0, "bytes_received": 2048,
               "nodes_ok": [f"ok{i}" for i in range(n)], "nodes_refused": {f"no{i}": "x" for i in range(m)}}
              for r, (n, m) in enumerate(zip(ok, refused), start=1)]
    nodes = {name: {"decision": "accepted", "reason": "", "epsilon": {str(r): e for r, e in eps.items()},
                    "rounds": list(eps)} for name, eps in epsilon.items()}
    return {"job": {"epsilon": 1.0, "delta": 1e-5, "min_nodes": min_nodes}, "rounds": rounds, "nodes": nodes}


def test_nodes_with_the_same_epsilon_share_one_labelled_line_and_others_stay_distinguishable():
    from fedtrain.server.report import privacy_figure

    same, near = {1: 0.5, 2: 0.9}, {1: 0.5, 2: 0.9001}
    fig = privacy_figure(report_of({"a": same, "b": same, "c": same, "d": near}, [4, 4], [0, 0], 3))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"a, b, c", "d", "job's ε"}
    assert list(lines["a, b, c"].get_ydata()) == [0.5, 0.9]
    # Lines that nearly coincide still differ in marker and style.
    assert (lines["a, b, c"].get_marker(), lines["a, b, c"].get_linestyle()) != (
        lines["d"].get_marker(), lines["d"].get_linestyle())
    fig.canvas.draw()
    legend = fig.axes[0].get_legend().get_window_extent()
    assert not legend.overlaps(fig.axes[0].get_window_extent())  # beside the axes, on no line


def test_the_participation_legend_covers_no_bar_and_min_nodes_shows_inside_the_axes():
    from fedtrain.server.report import participation_figure

    fig = participation_figure(report_of({}, [3, 2, 3], [0, 1, 0], 3))
    nodes, traffic = fig.axes
    fig.canvas.draw()
    legend = nodes.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in nodes.patches if p.get_height() > 0]
    assert len(bars) == 4 and not any(legend.overlaps(b) for b in bars)
    assert not legend.overlaps(traffic.get_window_extent())
    assert {t.get_text() for t in nodes.get_legend().get_texts()} == {"results", "refused or rejected", "min_nodes"}
    # A whole node of room above the line, whether it is level with the bars or above them.
    for ok, min_nodes in (([3, 2, 3], 3), ([2, 2, 2], 5)):
        nodes = participation_figure(report_of({}, ok, [0, 1, 0], min_nodes)).axes[0]
        line, = [line for line in nodes.get_lines() if line.get_label() == "min_nodes"]
        assert list(line.get_ydata()) == [min_nodes] * 2 and nodes.get_ylim() == (0, min_nodes + 1)
