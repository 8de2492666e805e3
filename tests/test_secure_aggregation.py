"""Secure aggregation end to end: a coordinator and node agents over loopback gRPC.

The agents run as threads of the test process (so that 10 of them fit on two cores),
each with its own state dir and gRPC channel, through the same code as `fedtrain node
start`. They record what they would have sent in the clear, so that the test can
check the coordinator's aggregate against the plain weighted average.
"""

import numpy as np
import pytest

from fedtrain.faults import Faults
from fedtrain.models import initial_state
from fedtrain.secagg.encoding import clip_range, error_bound, quant_bits

from conftest import make_spec
from test_end_to_end import wait_for

pytestmark = pytest.mark.slow


def secure_spec(n, min_nodes=None, rounds=1, retries=1):
    # A node that drops out while it trains costs the round its whole timeout: keep it short.
    return make_spec(min_nodes=min_nodes or n, secure_aggregation={"stage_timeout": 4.0}, round_timeout=15,
                     training={"rounds": rounds, "batch_size": 32, "learning_rate": 0.5}, round_retries=retries)


def check_aggregate(client, job_id, spec, contributors, round=1):
    """The coordinator's new model against start + the plain weighted average of the contributors' updates."""
    # FetchModel's round 0 means "latest": the starting model is rebuilt from the spec instead.
    start = client.model(job_id, round - 1) if round > 1 else initial_state(spec)
    after = client.model(job_id, round)
    clear = [node.agent.clear[round] for node in contributors]
    total_weight = sum(w for w, _ in clear)
    n = len(clear)
    bound = error_bound(n, clip_range(spec), quant_bits(n))
    for name in start:
        expected = start[name] + sum(w * u[name] for w, u in clear) / total_weight
        # Quantization error of the weighted sum and of the weight sum, then float32 rounding.
        scale = bound / total_weight * (1 + np.abs(expected - start[name]).max() / clip_range(spec))
        tolerance = 2 * scale + 1e-6 * np.abs(expected).max()
        assert np.abs(after[name] - expected).max() <= tolerance, name
        # Far from any aggregate that misses one node.
        some = sum(w * u[name] for w, u in clear[1:]) / sum(w for w, _ in clear[1:])
        assert np.abs(after[name] - start[name] - some).max() > 10 * tolerance


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_securely_aggregated_model_is_the_weighted_average_of_the_updates(consortium, n):
    start, client = consortium
    nodes = start(n)
    spec = secure_spec(n)
    job_id = client.submit(spec)
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=180)
    assert status.state == "finished", status.error
    check_aggregate(client, job_id, spec, nodes)
    round_nodes = status.rounds[1].nodes
    assert len(round_nodes) == n and not any(r.refusal for r in round_nodes)
    for node in nodes:
        # Charged once; the shard size stays inside the masked vector.
        assert node.charged_rounds(job_id) == [1]
    for r in round_nodes:
        metrics = {k for k in r.metrics}
        assert "num-examples" not in metrics and {"epsilon", "noise-multiplier"} <= metrics


def test_a_round_survives_one_dropout_before_the_masked_update_and_one_after(consortium):
    start, client = consortium
    nodes = start(5, faults=[Faults("secagg-before-masked"), Faults("secagg-after-masked")])
    spec = secure_spec(5, min_nodes=3)
    job_id = client.submit(spec)
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=180)
    assert status.state == "finished", status.error
    outcome = {n.name: n.refusal for n in status.rounds[1].nodes}
    assert len(outcome) == 5  # all five took part in the round
    assert outcome.pop("n0") == "dropped out: no answer to the collect stage in time"
    assert not any(outcome.values())
    # The node that died after sending its masked update is in the sum; the other is not.
    assert 1 not in nodes[0].agent.clear and 1 in nodes[1].agent.clear
    check_aggregate(client, job_id, spec, nodes[1:])
    # Nothing was charged for the update that never left; the one that left was charged.
    assert nodes[0].charged_rounds(job_id) == [] and nodes[1].charged_rounds(job_id) == [1]


def test_past_the_threshold_the_round_fails_keeps_the_model_and_the_job_goes_on(consortium):
    start, client = consortium
    nodes = start(5, faults=[Faults("secagg-before-masked")] * 3)
    spec = secure_spec(5, min_nodes=3, rounds=2, retries=0)
    job_id = client.submit(spec)
    wait_for(client, job_id, lambda s: len(s.rounds) >= 2, timeout=180)
    for node in nodes[:3]:  # the three come back, having lost the round's secrets
        node.thread.join(10)
        node.start()
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=180)
    assert status.state == "finished", status.error
    assert "round 1: only 0 node result(s)" in status.error
    assert "secure aggregation failed: collect: only 2 of 5 nodes sent masked updates and the threshold is 3" \
        in status.error
    model = [initial_state(spec)] + [client.model(job_id, r) for r in (1, 2)]
    assert all(np.array_equal(model[0][k], model[1][k]) for k in model[0])  # round 1 changed nothing
    assert any(not np.array_equal(model[1][k], model[2][k]) for k in model[0])
    check_aggregate(client, job_id, spec, nodes, round=2)
