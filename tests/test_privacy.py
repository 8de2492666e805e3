import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from fedtrain.errors import BudgetExceeded
from fedtrain.models import build_model
from fedtrain.privacy.accounting import RoundPlan, epsilon, expected_batch_size, plan_round
from fedtrain.node.dp_sgd import train_private
from fedtrain.node.ledger import PrivacyLedger

from conftest import make_spec


def test_calibrated_noise_spends_the_job_epsilon_over_all_rounds():
    spec = make_spec(training={"rounds": 4, "local_epochs": 2}, privacy={"epsilon": 2.0})
    plan = plan_round(spec, 150)
    assert plan.sample_rate == pytest.approx(1 / 5) and plan.steps == 10
    spent = epsilon([plan.as_history()] * 4, 1e-5)
    assert 1.95 <= spent <= 2.0


def test_merging_identical_mechanisms_matches_opacus_unmerged():
    history = [(1.1, 0.2, 10), (2.0, 0.1, 3), (1.1, 0.2, 10), (1.1, 0.2, 5)]
    accountant = RDPAccountant()
    accountant.history = history
    assert epsilon(history, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert epsilon([], 1e-5) == 0.0


def test_ledger_charges_refuses_and_survives_reopening(tmp_path):
    plan = RoundPlan(noise_multiplier=1.0, sample_rate=0.2, steps=10)
    one_round = epsilon([plan.as_history()], 1e-5)
    # RDP composes sub-additively: set the limit between one and two rounds' spend.
    limit = (one_round + epsilon([plan.as_history()] * 2, 1e-5)) / 2
    path = tmp_path / "ledger.db"
    ledger = PrivacyLedger(path, max_epsilon=limit, delta=1e-5)
    row = ledger.charge(job_id="j", round=1, plan=plan, job_delta=1e-5, task_id="t1", payload=b"update")
    assert row.epsilon == pytest.approx(one_round) and not row.sent
    with pytest.raises(BudgetExceeded, match="already released once"):
        ledger.charge(job_id="j", round=1, plan=plan, job_delta=1e-5, task_id="t2", payload=b"x")
    with pytest.raises(BudgetExceeded, match="above the policy's max_epsilon"):
        ledger.charge(job_id="j", round=2, plan=plan, job_delta=1e-5, task_id="t3", payload=b"x")
    ledger.close()  # as if the process died here, before sending

    reopened = PrivacyLedger(path, max_epsilon=limit, delta=1e-5)
    assert reopened.spent() == pytest.approx(one_round)
    [(pending, payload)] = reopened.undelivered()
    assert (pending.job_id, pending.round, payload) == ("j", 1, b"update")
    reopened.mark_sent("j", 1)
    assert reopened.undelivered() == [] and reopened.rows()[0].sent
    assert len(reopened.rows()) == 1


def test_dp_training_records_the_planned_spend_and_learns(cancer):
    x, y = cancer
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    spec = make_spec(training={"rounds": 1, "local_epochs": 3}, privacy={"epsilon": 8.0})
    table = TensorDataset(torch.from_numpy(x[:300]), torch.from_numpy(y[:300].astype(np.int64)))
    plan = plan_round(spec, len(table))
    torch.manual_seed(0)
    model = build_model(spec)
    result = train_private(model, table, spec, plan, expected_batch_size(plan, len(table)))
    assert result.plan == plan
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[300:])).argmax(1).numpy() == y[300:]).mean()
    assert acc > 0.85


def test_dp_noise_and_sampling_cannot_be_replayed_from_a_known_seed(cancer):
    x, y = cancer
    table = TensorDataset(torch.from_numpy(x[:64].astype(np.float32)), torch.from_numpy(y[:64].astype(np.int64)))
    spec = make_spec(training={"rounds": 1})
    plan = plan_round(spec, len(table))
    updates = []
    for _ in range(2):
        torch.manual_seed(0)  # whatever state the process was in, and the same model seed
        model = build_model(spec)
        train_private(model, table, spec, plan, expected_batch_size(plan, len(table)))
        updates.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    assert not torch.equal(updates[0], updates[1])
    # Building a model does not reset the process's RNG.
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    build_model(spec)
    assert torch.equal(torch.rand(3), expected)


def test_opacus_per_sample_gradients_match_torch_func():
    """Guards against silently wrong per-sample gradients after an Opacus upgrade."""
    spec = make_spec(model={"kind": "mlp", "hidden": [16, 8]})
    torch.manual_seed(0)
    model = build_model(spec)
    x, y = torch.randn(12, 4), torch.randint(0, 2, (12,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    expected = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], rtol=1e-5, atol=1e-6)


def test_epsilon_is_exactly_opacuss_from_cached_one_step_curves():
    """The ledger's ε is the number Opacus's RDP accountant gives for the same history."""
    rng = np.random.default_rng(0)
    for _ in range(6):
        history = [(float(rng.uniform(0.5, 3)), float(rng.choice([1.0, 1 / 3, 1 / 10, 1 / 64])), int(rng.integers(1, 200)))
                   for _ in range(int(rng.integers(1, 4)))]
        accountant = RDPAccountant()
        accountant.history = list(history)
        assert epsilon(history, 1e-5) == accountant.get_epsilon(delta=1e-5)
    assert epsilon([], 1e-5) == 0.0


def test_job_plan_is_the_nodes_plan_and_warns_of_the_regimes_that_train_poorly():
    from fedtrain.node.round import PrivateRound
    from fedtrain.privacy.planning import plan_node, trainable_parameters

    poor = make_spec(training={"rounds": 50, "batch_size": 16}, privacy={"epsilon": 0.5})
    plan = plan_node(poor, 150, trainable_parameters(poor))
    node = PrivateRound(poor, 150).plan  # what a node declaring 150 rows trains and charges under
    assert (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round) == (
        node.noise_multiplier, node.sample_rate, node.steps)
    assert plan.trainable_parameters == 4 * 2 + 2 and plan.epsilon == pytest.approx(0.5, abs=0.01)
    assert [w.split()[0:2] for w in plan.warnings] == [["logical", "batch"], ["noise", "multiplier"],
                                                       ["noise-to-signal", f"{plan.noise_to_signal:.2f}"]]
    good = make_spec(training={"rounds": 2, "batch_size": 512}, privacy={"epsilon": 8.0})
    assert plan_node(good, 5000, trainable_parameters(good)).warnings == []
