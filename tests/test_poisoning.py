"""One node poisons the global model (issue 14, part 4, in the clear; part 6, reply schema).

The attacks run against the real coordinator over loopback gRPC and real node agents
(``consortium``), one of them made hostile by replacing one of its methods: ``_send``
(which then skips the node's own egress check) or ``tasks.local_update``. The defender is
never mocked. The bound itself is tested against the real DP-SGD training code.
"""

import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedtrain.data import write_table
from fedtrain.errors import SpecError, WireError
from fedtrain.models import build_model, evaluate, initial_state, load_dataset, load_trainable_state
from fedtrain.privacy.accounting import RoundPlan, expected_batch_size, plan_round
from fedtrain.node.dp_sgd import train_round
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import decode_arrays, encode_arrays, encode_values
from fedtrain.protocol.records import numpy_to_arrays, with_message_id
from fedtrain.server.robust import check_plan, update_bound
from fedtrain.server.rounds import run_rounds
from fedtrain.server.strategy import build_strategy

from conftest import FEATURES, eventually, make_spec
from test_end_to_end import wait_for


@pytest.fixture(scope="module")
def scaling(cancer):
    # Public constants (the published data set's own), as a job spec states them.
    x, _ = cancer
    return {"mean": x.mean(axis=0).tolist(), "std": x.std(axis=0).tolist()}


def plain_spec(scaling, **over):
    return make_spec(**{"data": {"scaling": scaling}, "min_nodes": 2, "secure_aggregation": False,
                        "round_timeout": 30, "round_retries": 0,
                        "training": {"rounds": 3, "batch_size": 32, "learning_rate": 0.5}, **over})


def accuracy(client, job_id, spec, cancer, tmp_path):
    """The final global model's accuracy on every breast-cancer row."""
    x, y = cancer
    path = tmp_path / "all.csv"
    write_table(path, FEATURES, x, "malignant", y)
    model = build_model(spec)
    load_trainable_state(model, client.model(job_id))
    return evaluate(model, load_dataset(path, spec), spec)["accuracy"]


def refusals(status, name):
    return [n.refusal for r in status.rounds for n in r.nodes if n.name == name]


def run_job(client, spec):
    job_id = client.submit(spec)
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=120)
    return job_id, status


def rewrite_results(agent, rewrite):
    """Make ``agent`` hostile: its results in the clear leave as ``rewrite(header, arrays)``
    turns them, past the node's own egress check."""
    honest = agent._send

    def send(message_type, call, request, *args, **kw):
        if message_type != "SubmitResult":
            return honest(message_type, call, request, *args, **kw)
        parts = list(request)
        header = parts[0].header
        if header.refusal or len(parts) == 1:
            return honest(message_type, call, iter(parts), *args, **kw)
        arrays = rewrite(header, decode_arrays([p.tensor for p in parts[1:]]))
        return call(iter([pb.ResultPart(header=header)] + [pb.ResultPart(tensor=c) for c in encode_arrays(arrays)]))

    agent._send = send


# --- attacks against real processes ------------------------------------------------------

def test_a_node_sending_1e30_with_1e18_examples_is_rejected_and_the_model_stays_accurate(consortium, scaling,
                                                                                         cancer, tmp_path):
    start, client = consortium
    nodes = start(3)

    def huge(header, arrays):
        header.metrics["num-examples"].CopyFrom(encode_values({"num-examples": 10**18})["num-examples"])
        return {k: np.full_like(v, 1e30) for k, v in arrays.items()}

    rewrite_results(nodes[0].agent, huge)
    spec = plain_spec(scaling)
    job_id, status = run_job(client, spec)
    assert status.state == "finished", status.error
    reasons = refusals(status, "n0")
    assert len(reasons) == 3 and all("rejected by coordinator" in r and "update_bound" in r for r in reasons)
    assert not any(refusals(status, "n1") + refusals(status, "n2"))
    counted = start.coordinator.metrics.registry.get_sample_value
    assert [counted("fedtrain_updates_rejected_total", {"job": job_id, "node": n}) for n in ("n0", "n1")] == [3, None]
    # Before the bound this attack left accuracy at 0.507 (issue 14).
    assert accuracy(client, job_id, spec, cancer, tmp_path) > 0.85


def reversed_within_bound(agent, fraction=0.9):
    """Make ``agent`` hostile within the bound: it trains, then sends its update reversed and
    stretched to ``fraction`` of the coordinator's bound (a plan and metrics as honest)."""
    tasks = eventually(lambda: getattr(agent, "tasks", None), "the node to load its training")
    honest = tasks.local_update

    def local_update(task, private, start):
        update = honest(task, private, start)
        change = {k: update.arrays[k] - start[k] for k in start}
        norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in change.values()))
        scale = fraction * update_bound(private.spec, private.plan, start) / norm
        return type(update)({k: (start[k] - scale * change[k]).astype(start[k].dtype) for k in start}, update.loss)

    tasks.local_update = local_update


@pytest.mark.parametrize("strategy, robust", [
    ({"name": "fedmedian"}, True),
    ({"name": "fedtrimmedavg", "params": {"beta": 0.34}}, True),
    ({"name": "fedavg"}, False),
])
def test_robust_aggregation_outvotes_an_update_within_the_bound(consortium, scaling, cancer, tmp_path,
                                                                strategy, robust):
    start, client = consortium
    nodes = start(3)
    reversed_within_bound(nodes[0].agent)
    spec = plain_spec(scaling, strategy=strategy, min_nodes=3)
    job_id, status = run_job(client, spec)
    assert status.state == "finished", status.error
    assert not any(refusals(status, "n0"))  # within the bound: accepted every round
    acc = accuracy(client, job_id, spec, cancer, tmp_path)
    if robust:
        assert acc > 0.85
    else:  # the control: the same updates, averaged, break the model
        assert acc < 0.6


def test_a_reply_with_an_extra_metric_is_rejected_and_the_job_goes_on(consortium, scaling, cancer, tmp_path):
    start, client = consortium
    nodes = start(3)

    def extra(header, arrays):
        header.metrics["x"].CopyFrom(encode_values({"x": 1.0})["x"])
        return arrays

    rewrite_results(nodes[0].agent, extra)
    spec = plain_spec(scaling, training={"rounds": 2})
    job_id, status = run_job(client, spec)
    # Before: Flower's InconsistentMessageReplies failed the job in round 1.
    assert status.state == "finished", status.error
    assert all("metrics must be exactly" in r for r in refusals(status, "n0"))
    assert accuracy(client, job_id, spec, cancer, tmp_path) > 0.85


# --- the bound against the real training code ----------------------------------------------

BOUND_CASES = [
    # (rows, training, strategy): q = 1 and q < 1, momentum, FedProx, several epochs, tiny batches, Adam(W)
    (1, {"batch_size": 32}, {}),
    (20, {"batch_size": 32, "momentum": 0.9}, {}),
    (33, {"batch_size": 32}, {}),
    (150, {"batch_size": 16, "local_epochs": 2, "momentum": 0.5}, {}),
    (150, {"batch_size": 8}, {"name": "fedprox", "params": {"proximal_mu": 1.0}}),
    (40, {"batch_size": 1}, {}),
    (150, {"batch_size": 16, "local_epochs": 2, "optimizer": "adam"}, {}),
    (60, {"batch_size": 8, "optimizer": "adamw", "weight_decay": 0.5, "betas": (0.5, 0.9)},
     {"name": "fedprox", "params": {"proximal_mu": 1.0}}),
]


@pytest.mark.parametrize("rows, training, strategy", BOUND_CASES)
def test_honest_dp_sgd_updates_are_always_within_the_bound(tmp_path, cancer, scaling, rows, training, strategy):
    x, y = cancer
    spec = make_spec(data={"scaling": scaling}, training={"rounds": 3, "learning_rate": 0.5, **training},
                     strategy=strategy or {"name": "fedavg"})
    path = tmp_path / "rows.csv"
    # Worst-case data for the data term: one class, so every clipped gradient points alike.
    write_table(path, FEATURES, x[:rows] * 10, "malignant", np.ones(rows, dtype=int))
    dataset = load_dataset(path, spec)
    plan = plan_round(spec, rows)
    check_plan(spec, plan)
    start = initial_state(spec)
    bound = update_bound(spec, plan, start)
    norms = []
    for _ in range(15):
        update = train_round(spec, dataset, start, plan, expected_batch_size(plan, rows)).arrays
        norms.append(np.sqrt(sum(float(np.sum((update[k].astype(np.float64) - start[k]) ** 2)) for k in start)))
    assert max(norms) <= bound < 200 * max(norms)  # a bound, and not a formality


PLAN_SPEC = make_spec(training={"local_epochs": 2, "max_steps_per_round": 100})
HONEST = plan_round(PLAN_SPEC, 190)  # 6 batches an epoch: 12 steps at sample rate 1/6


@pytest.mark.parametrize("lie", [
    RoundPlan(HONEST.noise_multiplier * 3, HONEST.sample_rate, HONEST.steps),  # more noise, a larger bound
    RoundPlan(HONEST.noise_multiplier, 0.5, HONEST.steps),  # another sample rate
    RoundPlan(HONEST.noise_multiplier, HONEST.sample_rate, 13),  # not a whole number of epochs
    RoundPlan(HONEST.noise_multiplier, 1 / 60, 120),  # over training.max_steps_per_round
    RoundPlan(HONEST.noise_multiplier, HONEST.sample_rate, 0),
], ids=["noise", "rate", "epochs", "cap", "no-steps"])
def test_a_plan_the_spec_does_not_imply_is_rejected(lie):
    check_plan(PLAN_SPEC, HONEST)
    with pytest.raises(WireError, match="steps"):
        check_plan(PLAN_SPEC, lie)


# --- the spec and the strategy ---------------------------------------------------------------

def test_the_spec_refuses_a_robust_strategy_under_secure_aggregation_and_bad_params():
    with pytest.raises(SpecError, match="needs each node's update, which secure aggregation hides"):
        make_spec(strategy={"name": "krum"}, min_nodes=3)  # secure aggregation is on by default at 3
    make_spec(strategy={"name": "krum"}, min_nodes=3, secure_aggregation=False)
    with pytest.raises(SpecError, match="bulyan needs min_nodes >= 4 \\* num_malicious_nodes \\+ 3"):
        make_spec(strategy={"name": "bulyan", "params": {"num_malicious_nodes": 1}}, min_nodes=5,
                  secure_aggregation=False)
    with pytest.raises(SpecError, match="proximal_mu is 2"):
        make_spec(strategy={"name": "fedprox", "params": {"proximal_mu": 4.0}})
    with pytest.raises(SpecError, match="max_steps_per_round"):
        make_spec(training={"max_steps_per_round": 0})


def _replies(messages, updates, metrics):
    out = []
    for msg, arrays, m in zip(messages, updates, metrics):
        msg = with_message_id(msg, uuid.uuid4().hex)  # as the grid posts it
        out.append(Message(RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": MetricRecord(m)}),
                           reply_to=msg))
    return out


class FakeGrid:
    """Two nodes that answer every round with fixed updates and metrics."""

    def __init__(self, updates, metrics):
        self.updates, self.metrics = updates, metrics

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, *, timeout=None):
        return _replies(list(messages), self.updates, self.metrics)


def test_weights_are_capped_by_max_weight_and_count_params_are_whole():
    spec = make_spec(min_nodes=2, secure_aggregation={"enabled": False, "max_weight": 100})
    start = initial_state(spec)
    ones, threes = ({k: np.full_like(v, c) for k, v in start.items()} for c in (1.0, 3.0))
    strategy = build_strategy(spec)
    messages = strategy.configure_train(1, numpy_to_arrays(start), ConfigRecord(),
                                        FakeGrid([], []))
    replies = _replies(list(messages), [ones, threes], [{"num-examples": 10**18}, {"num-examples": 100}])
    aggregated, _ = strategy.aggregate_train(1, replies)
    for v in aggregated.to_numpy_ndarrays():
        np.testing.assert_allclose(v, 2.0)  # equal weights: 1e18 examples count as 100
    krum = build_strategy(make_spec(strategy={"name": "krum", "params": {"num_malicious_nodes": 1}},
                                    min_nodes=3, secure_aggregation=False))
    assert krum.num_malicious_nodes == 1 and isinstance(krum.num_malicious_nodes, int)
    with pytest.raises(ValueError, match="whole number"):
        build_strategy(make_spec(strategy={"name": "krum", "params": {"num_malicious_nodes": 1.5}},
                                 min_nodes=3, secure_aggregation=False))


def test_a_strategy_error_gives_up_its_round_and_the_job_goes_on():
    spec = make_spec(min_nodes=2, secure_aggregation=False, training={"rounds": 2})
    start = initial_state(spec)
    ones = {k: np.full_like(v, 1.0) for k, v in start.items()}
    # Metric keys that differ between replies: Flower raises InconsistentMessageReplies.
    grid = FakeGrid([ones, ones], [{"num-examples": 5}, {"num-examples": 5, "x": 1.0}])
    rounds = []
    run_rounds(build_strategy(spec), grid, spec, start, 1, lambda r, w, given_up: rounds.append((r, w, given_up)))
    assert [r for r, _, _ in rounds] == [1, 2]
    for _, weights, given_up in rounds:
        assert "the strategy failed: InconsistentMessageReplies" in given_up and "global model unchanged" in given_up
        assert all(np.array_equal(weights[k], start[k]) for k in start)
