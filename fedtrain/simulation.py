"""``fedtrain simulate``: rehearse a job with N virtual nodes on one machine.

A data set is cut into N partitions (IID, or non-IID by a Dirichlet draw over the
label, with Flower Datasets' partitioners), and Flower's simulation engine (Ray) runs
the job: each virtual node is the node agent's own ``ClientApp`` (the same DP-SGD
training, the same reply) reading its partition, and the rounds are the coordinator's
own loop and strategy (``fedtrain.server.rounds``), with central evaluation on the spec's
evaluation table. What a rehearsal leaves out is the deployment around that code:
policies, ledgers, approvals, TLS, and secure aggregation, whose sum equals the plain
one up to quantization.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import TensorDataset

from fedtrain.node.client_app import app as node_app
from fedtrain.node.dp_sgd import LocalUpdate
from fedtrain.node.round import PrivateRound
from fedtrain.protocol.records import arrays_to_numpy, numpy_to_arrays, with_message_id
from fedtrain.data import read_arrow, write_arrow
from fedtrain.errors import FedtrainError, SpecError
from fedtrain.spec import JobSpec

FLOWER_LOG = "flower.log"

SCHEMES = ("iid", "dirichlet")


def partition_rows(labels: list, num_nodes: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
                   min_size: int = 1) -> list[np.ndarray]:
    """Row indices of each of ``num_nodes`` partitions, drawn by Flower Datasets' partitioners.

    ``iid``: a shuffled, near-equal split. ``dirichlet``: each label's rows are spread over
    the nodes by a Dirichlet(``alpha``) draw (small alpha: each node sees few labels), redrawn
    until every node holds at least ``min_size`` rows.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_nodes < 1:
        raise ValueError("a simulation needs at least one node")
    if len(labels) < num_nodes * min_size:
        raise SpecError(f"{len(labels)} rows cannot give {num_nodes} nodes {min_size} row(s) each;"
                        " simulate fewer nodes or use a larger data set")
    rows = Dataset.from_dict({"row": np.arange(len(labels)), "label": [str(v) for v in labels]})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_nodes)
        rows = rows.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_nodes, partition_by="label", alpha=alpha,
                                           min_partition_size=min_size, self_balancing=True, seed=seed)
    else:
        raise SpecError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    partitioner.dataset = rows
    try:
        with warnings.catch_warnings():  # one per Dirichlet redraw; failing for good raises below
            warnings.simplefilter("ignore", UserWarning)
            return [np.asarray(partitioner.load_partition(i)["row"]) for i in range(num_nodes)]
    except ValueError as err:  # Dirichlet draws that keep leaving a node under min_size
        raise SpecError(f"cannot draw {num_nodes} Dirichlet partitions with alpha={alpha} and at least"
                        f" {min_size} row(s) each ({err}); raise alpha or simulate fewer nodes") from None


def write_partitions(data: Path, spec: JobSpec, num_nodes: int, out: Path, scheme: str = "iid",
                     alpha: float = 0.5, seed: int = 0) -> list[int]:
    """Cut ``data`` into ``num_nodes`` files in ``out`` (``0.csv``, ``1.csv``, ...), in its own format;
    returns their sizes."""
    table = read_arrow(data)
    label = spec.data.label if spec.num_classes is not None else None  # generative jobs have none
    if scheme == "dirichlet" and label is None:
        raise SpecError("a Dirichlet partition spreads each label over the nodes; this job's data has no label")
    if label is not None and label not in table.column_names:
        raise SpecError(f"{data}: missing label column {label!r}; the file has {table.column_names}")
    labels = table.column(label).to_pylist() if label is not None else [0] * table.num_rows
    out.mkdir(parents=True, exist_ok=True)
    partitions = partition_rows(labels, num_nodes, scheme, alpha, seed)
    for i, rows in enumerate(partitions):
        write_arrow(table.take(rows), out / f"{i}{data.suffix.lower()}")
    return [len(rows) for rows in partitions]


@dataclass
class RoundResult:
    round: int
    nodes: int  # virtual nodes whose update was aggregated
    wall_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # virtual nodes whose training failed, by reason
    given_up: str = ""  # why the round aggregated nothing


@dataclass
class SimulationResult:
    nodes: int
    scheme: str
    partition_sizes: list[int]
    rounds: list[RoundResult]
    epsilon: list[float]  # each node's ε over the job, by Opacus's accountant (0 if it never trained)
    peak_rss_bytes: int  # the simulation's processes together (this one, Ray's and its workers)
    wall_seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class _PeakMemory(threading.Thread):
    """Samples the resident memory of this process and all its descendants (Ray's raylet,
    GCS and workers) and keeps the largest total seen."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True, name="peak-memory")
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a worker that just ended
                pass
        self.peak = max(self.peak, total)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.sample()
        return self.peak


# The virtual node: fedtrain's node ClientApp, on the partition Flower assigned it.
client_app = ClientApp()


@client_app.train()
def _train_partition(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    partition = Path(str(config["partition-dir"])) / f"{context.node_config['partition-id']}{config['suffix']}"
    node = Context(run_id=context.run_id, node_id=context.node_id, node_config={"data-path": str(partition)},
                   state=context.state, run_config={"job-spec": str(config["job-spec"])})
    return node_app(msg, node)


def _failure(reason: str, work: Path) -> str:
    """A virtual node's error, as the ClientApp raised it (Flower wraps it in Ray's traceback),
    with its partition's path left out so that equal failures count together."""
    raised = re.search(r"Exception ClientAppException occurred\. Message: (.*)'>\s*$", reason, flags=re.S)
    text = raised.group(1) if raised else reason
    text = re.sub(re.escape(str(work / "partitions")) + r"/\d+\.\w+", "its partition", text)
    return " ".join(text.split())


@contextlib.contextmanager
def _flower_log_to(path: Path) -> Iterator[None]:
    """Send Flower's log to ``path`` instead of the console: the engine logs every failed virtual
    node with its traceback (thousands of lines), while the result names each failure once."""
    flower = logging.getLogger("flwr")
    saved = flower.handlers, flower.propagate, flower.level
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    flower.handlers, flower.propagate = [handler], False
    flower.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.close()
        flower.handlers, flower.propagate = saved[:2]
        flower.setLevel(saved[2])


def simulate(
    spec: JobSpec, data: Path, num_nodes: int, work: Path, scheme: str = "iid", alpha: float = 0.5, seed: int = 0,
    cpus_per_node: float = 1.0, on_round: Callable[[RoundResult], None] = lambda r: None,
) -> SimulationResult:
    """Run ``spec`` with ``num_nodes`` virtual nodes on partitions of ``data`` written to ``work``
    (with Flower's log, ``flower.log``). A round in which every virtual node fails with the same
    error ends the rehearsal with that error (FedtrainError)."""
    from flwr.app import ConfigRecord
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedtrain.models import build_model, evaluate, initial_state, load_dataset, load_trainable_state
    from fedtrain.privacy.accounting import epsilon
    from fedtrain.server.rounds import run_rounds
    from fedtrain.server.strategy import build_strategy

    if num_nodes < spec.min_nodes:
        raise SpecError(f"the job needs min_nodes={spec.min_nodes} per round; simulate at least that many nodes")
    strategy = build_strategy(spec)  # bad strategy params are refused before anything starts
    cpus = os.cpu_count() or 1
    if cpus_per_node > cpus:
        raise FedtrainError(f"cpus_per_node={cpus_per_node:g} is more than this machine's {cpus} CPUs:"
                            " Ray could not start a single virtual node")
    started = time.monotonic()
    sizes = write_partitions(data, spec, num_nodes, work / "partitions", scheme, alpha, seed)
    eval_data = load_dataset(spec.evaluation.data, spec) if spec.evaluation else None
    eval_model = build_model(spec) if eval_data is not None else None
    rounds: list[RoundResult] = []
    history: dict[int, list[tuple[float, float, int]]] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        clock = [time.monotonic()]

        def after_round(server_round: int, weights: dict[str, np.ndarray], given_up: str) -> None:
            for node, metrics in strategy.accepted if not given_up else []:
                history.setdefault(node, []).append(
                    (float(metrics["noise-multiplier"]), float(metrics["sample-rate"]), int(metrics["steps"])))
            metrics = {}
            if eval_model is not None:
                load_trainable_state(eval_model, weights)
                metrics = evaluate(eval_model, eval_data, spec)
            now = time.monotonic()
            result = RoundResult(server_round, 0 if given_up else len(strategy.accepted), now - clock[0], metrics,
                                 dict(Counter(_failure(e, work) for e in strategy.errors)), given_up)
            clock[0] = now
            rounds.append(result)
            on_round(result)
            if len(result.failed) == 1 and sum(result.failed.values()) == num_nodes:
                # The same error everywhere (a missing column, a model that does not fit) comes back
                # every round: the rehearsal stops here rather than run them all.
                (reason, _), = result.failed.items()
                raise FedtrainError(f"every virtual node failed in round {server_round} with the same error, so the"
                                    f" rehearsal stopped after round {server_round} of {spec.training.rounds}:"
                                    f" {reason} (tracebacks in {work / FLOWER_LOG})")

        config = ConfigRecord({"job-spec": spec.canonical_json(), "partition-dir": str(work / "partitions"),
                               "suffix": data.suffix.lower()})
        # The engine starts this app while it is still registering the virtual nodes; the first
        # round would sample only those registered by then.
        deadline = time.monotonic() + 300
        while len(grid.get_node_ids()) < num_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(grid.get_node_ids())} of {num_nodes} virtual nodes came up")
            time.sleep(0.05)
        run_rounds(strategy, grid, spec, initial_state(spec), 1, after_round, config=config)

    backend = {
        # CPUs Ray reserves per virtual node in training. Flower's default of 2 trains one node at a
        # time on a 2-core laptop; 1 trains one per core, and below 1 only adds workers' memory
        # (see `python -m bench --only simulate`).
        "client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "object_store_memory": 128 * 2**20, "logging_level": "WARNING",
                      # A virtual node's failure comes back in its reply, hence in the round's result.
                      "log_to_driver": False},
    }
    for var in ("FLWR_TELEMETRY_ENABLED", "RAY_USAGE_STATS_ENABLED", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"):
        os.environ.setdefault(var, "0")
    memory = _PeakMemory()
    memory.start()
    try:
        with _flower_log_to(work / FLOWER_LOG):
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                           backend_config=backend)
    finally:
        peak = memory.stop()
    if len(rounds) != spec.training.rounds:
        raise FedtrainError(f"the simulation ended after {len(rounds)} of {spec.training.rounds} rounds;"
                            f" {work / FLOWER_LOG} says why")
    # Nodes of equal size ran the same mechanism: one accountant call per distinct history.
    by_history = {h: epsilon(h, spec.privacy.delta) for h in {tuple(h) for h in history.values()}}
    spent = [by_history[tuple(h)] for h in history.values()] + [0.0] * (num_nodes - len(history))
    return SimulationResult(nodes=num_nodes, scheme=scheme, partition_sizes=sizes, rounds=rounds, epsilon=spent,
                            peak_rss_bytes=peak, wall_seconds=time.monotonic() - started)


class LocalGrid:
    """Nodes in this process as a Flower grid: each message is answered at once by that node's
    ``PrivateRound``, with the reply a node agent sends (its update and public metrics). Node
    ``i`` (id ``i + 1``) trains on ``datasets[i]`` under the plan for ``declared[i]`` rows
    (default: its rows). Like the simulation, it leaves out the deployment around them:
    policies, ledgers, TLS and secure aggregation."""

    def __init__(self, spec: JobSpec, datasets: list[TensorDataset], declared: list[int] | None = None):
        self.spec = spec
        self.datasets = datasets
        self.private = [PrivateRound(spec, n) for n in (declared or [len(d) for d in datasets])]

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.datasets) + 1))

    def trained(self, node: int, start: dict[str, np.ndarray], update: LocalUpdate) -> None:
        """Called after each node's round, before its reply: what a subclass observes."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            i = msg.metadata.dst_node_id - 1
            start = arrays_to_numpy(msg.content["arrays"])
            update = self.private[i].train(self.datasets[i], start)
            self.trained(i, start, update)
            content = RecordDict({"arrays": numpy_to_arrays(update.arrays),
                                  "metrics": MetricRecord(self.private[i].metrics(num_examples=True))})
            replies.append(Message(content, reply_to=with_message_id(msg, uuid.uuid4().hex)))
        return replies


def play_the_server() -> None:
    """Flower stamps messages with a process-wide task identity; outside a Flower app (and a
    coordinator, which sets the same) an in-process run plays the server's role, as the coordinator does."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id
    except RuntimeError:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def run_in_process(spec: JobSpec, datasets: list[TensorDataset]) -> list[dict[str, float]]:
    """Run ``spec`` with one in-process node per dataset (``LocalGrid``), through the coordinator's
    own rounds and strategy; returns the central evaluation's metrics after each round (empty
    without ``spec.evaluation``). Faster than ``simulate`` for a few nodes: no Ray, no workers."""
    from fedtrain.models import build_model, evaluate, initial_state, load_dataset, load_trainable_state
    from fedtrain.server.rounds import run_rounds
    from fedtrain.server.strategy import build_strategy

    eval_data = load_dataset(spec.evaluation.data, spec) if spec.evaluation else None
    model = build_model(spec)
    metrics: list[dict[str, float]] = []

    def after_round(server_round: int, weights: dict[str, np.ndarray], given_up: str) -> None:
        if given_up:
            raise FedtrainError(f"round {server_round} was given up: {given_up}")
        if eval_data is not None:
            load_trainable_state(model, weights)
            metrics.append(evaluate(model, eval_data, spec))

    play_the_server()
    run_rounds(build_strategy(spec), LocalGrid(spec, datasets), spec, initial_state(spec), 1, after_round)
    return metrics
