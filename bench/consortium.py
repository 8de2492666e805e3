"""One job on a local consortium of real processes on 127.0.0.1: a coordinator and a node per shard."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedtrain.data import read_arrow
from fedtrain.demos.launch import LocalConsortium
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.spec import JobSpec

NODES = ("a", "b", "c")


@dataclass
class LocalJob:
    job_id: str
    status: pb.JobStatus
    spawned: dict[str, float]  # node name -> time.time() just before its process was spawned
    logs: Path                 # every process's log, <key>.log (coordinator, node-<name>)


def run_job(root: Path, spec: JobSpec, shards: list[Path], **consortium) -> LocalJob:
    """Start a fresh consortium under ``root`` (``consortium``: LocalConsortium's options), start
    the nodes, submit ``spec`` at once and wait for it to finish."""
    root.mkdir(parents=True, exist_ok=True)
    eval_dir = Path(spec.evaluation.data).parent if spec.evaluation else None
    spawned = {}
    with LocalConsortium(root, eval_dir=eval_dir, **consortium) as local:
        local.start_coordinator()
        local.enroll(list(NODES))  # before the clock starts: issuing certificates is the operator's, not the node's
        for name, shard in zip(NODES, shards):
            policy = root / f"policy-{name}.yaml"
            policy.write_text(yaml.safe_dump({"max_epsilon": 10.0, "delta": 1e-5,
                                              "dataset_size": read_arrow(shard).num_rows}))
            spawned[name] = time.time()
            local.start_node(name, shard, policy)
        with local.client() as client:
            job_id = client.submit(spec)
            while (status := client.status(job_id)).state not in ("finished", "failed"):
                # A process that died (a node that cannot start) would leave the job waiting forever.
                if dead := next((key for key, proc in local.processes.items() if proc.poll() is not None), None):
                    last = (local.logs / f"{dead}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(f"bench: {dead} exited during the job: {''.join(last)}")
                time.sleep(0.3)
    if status.state != "finished" or status.error:
        raise RuntimeError(f"bench job {status.state}: {status.error}")
    return LocalJob(job_id, status, spawned, local.logs)
