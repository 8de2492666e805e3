"""The wheel, installed as a user installs it: nothing may depend on the source tree.

It is built from a copy of this checkout and installed, not editable, into a clean venv.
Installing its dependencies from PyPI would take minutes, so that venv reaches the project
venv's site-packages through a .pth line: a directory added that way does not have its own
.pth files run, so the project's editable install (a .pth hook there) stays inactive.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from fedtrain.demos.launch import LocalConsortium

from conftest import make_spec
from test_end_to_end import write_policy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedtrain", "coordinator", "nodes")


def run(*args, **kw) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def checkout_files() -> list[str]:
    """What a clone of this checkout holds: tracked files, and new ones git does not ignore."""
    out = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, wheel, checkout files): the wheel of a copy of this checkout, in a clean venv."""
    tmp = tmp_path_factory.mktemp("package")
    files = checkout_files()
    for f in files:  # a copy: building writes build/ next to the sources
        (tmp / "src" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tmp / "src" / f)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
        tmp / "src")
    [wheel] = (tmp / "dist").glob("fedtrain-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel)
    # Only now: pip would otherwise find the project's own (editable) fedtrain there.
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "project-dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    return venv, wheel, files


@pytest.fixture
def elsewhere(tmp_path):
    """Where the installed commands run: no source tree in the working directory or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {"cwd": tmp_path, "env": env}


def test_the_wheel_holds_every_file_of_its_packages(installed):
    _, wheel, files = installed
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f for f in files if f.split("/")[0] in PACKAGES and not f.endswith(".pyc")}
    assert wanted - in_wheel == set()  # sources, the .proto and its stubs, package data
    entry_points = zipfile.ZipFile(wheel).read("fedtrain-0.1.0.dist-info/entry_points.txt").decode()
    for line in ("fedtrain = fedtrain.cli.main:main", "coordinator = coordinator.cli:app", "node = nodes.cli:app"):
        assert line in entry_points


def test_the_installed_package_runs_a_job_without_the_source_tree(installed, elsewhere, shards, tmp_path):
    venv, _, _ = installed
    where = json.loads(run(venv / "bin" / "python", "-c", """if True:
        import importlib.metadata, importlib.resources, json, sys
        import coordinator, fedtrain, nodes
        print(json.dumps({
            "files": [m.__file__ for m in (fedtrain, coordinator, nodes)],
            "dist": str(importlib.metadata.distribution("fedtrain").locate_file("")),
            "proto": importlib.resources.files("fedtrain.protocol").joinpath("fedtrain.proto").is_file(),
            "editable": [m for m in sys.modules if m.startswith("__editable__")],
            "path": sys.path}))""", **elsewhere))
    site = str(venv / "lib")
    assert all(f.startswith(site) for f in where["files"]), where["files"]
    assert where["dist"].startswith(site) and where["proto"] and where["editable"] == []
    assert str(ROOT) not in where["path"]

    fedtrain = venv / "bin" / "fedtrain"
    usage = run(fedtrain, "--help", **elsewhere)
    for command in ("coordinator", "node", "job", "demo"):  # the services' groups come from entry points
        assert command in usage

    # A coordinator, one node and an operator, each the installed `fedtrain` command.
    paths, _ = shards
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=5.0)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec(min_nodes=1).model_dump(mode="json")))
    with LocalConsortium(tmp_path / "run", poll_seconds=1, secure=False, fedtrain=(str(fedtrain),)) as c:
        address = c.start_coordinator()
        c.start_node("n0", paths[0], policy)
        out = run(fedtrain, "job", "submit", spec_file, "--wait", "--coordinator", address, "--insecure",
                  **elsewhere)
    [report] = (c.root / "coordinator" / "reports").glob("*/report.json")
    report = json.loads(report.read_text())
    assert report["job"]["state"] == "finished", out
    assert [(r["round"], r["nodes_ok"]) for r in report["rounds"]] == [(0, []), (1, ["n0"]), (2, ["n0"])]
