"""How a node trains a round: logical vs physical batches (Opacus's BatchMemoryManager),
hooks vs ghost clipping, bf16 autocast, and the device its policy lets a job use.

None of these may change what a round releases beyond rounding: with the secret seeds
fixed, physical batches and ghost clipping give the same update, plan and accountant
history as whole batches with hooks; bf16 gives the same plan, its weights in float32."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedtrain.errors import FedtrainError
from fedtrain.models import initial_state, load_dataset
from fedtrain.node import dp_sgd
from fedtrain.node.round import PrivateRound
from fedtrain.node.training import training_device
from fedtrain.privacy.accounting import RoundPlan, batches_per_epoch

from conftest import llm_spec, make_spec, sentences, write_texts


@pytest.fixture
def rows(cancer):
    x, y = cancer
    x = (x - x.mean(0)) / x.std(0)  # a test's own scaling; a job would put constants in its spec
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y))


@pytest.fixture
def fixed_secrets(monkeypatch):
    """The CSPRNG seeds of sampling and noise fixed, so that two runs draw the same batches and noise."""
    monkeypatch.setattr(dp_sgd.secrets, "randbits", lambda bits: 1234)


def physical_sizes(monkeypatch):
    """The row counts of the batches the loss sees, recorded."""
    sizes, real = [], dp_sgd.loss_fn

    def recording(spec):
        loss = real(spec)

        def f(model, batch):
            sizes.append(len(batch[0]))
            return loss(model, batch)
        return f
    monkeypatch.setattr(dp_sgd, "loss_fn", recording)
    return sizes


def train(spec, data):
    private = PrivateRound(spec, len(data))
    update = private.train(data, initial_state(spec))
    return private.plan, update.arrays


def test_physical_batches_take_the_same_steps_and_noise_as_the_logical_batch(rows, fixed_secrets, monkeypatch):
    hooks = {"batch_size": 128, "local_epochs": 2, "grad_sample_mode": "hooks"}  # physical_sizes records loss_fn
    spec = make_spec(model={"kind": "mlp", "hidden": [16]}, training=hooks)
    whole_plan, whole = train(spec, rows)
    sizes = physical_sizes(monkeypatch)
    split = make_spec(model={"kind": "mlp", "hidden": [16]}, training={**hooks, "physical_batch_size": 16})
    split_plan, parts = train(split, rows)
    assert split_plan == whole_plan and whole_plan.steps == 2 * batches_per_epoch(len(rows), 128)
    assert max(sizes) <= 16 and len(sizes) > 2 * whole_plan.steps  # it really split them
    for k in whole:
        np.testing.assert_allclose(parts[k], whole[k], atol=1e-5)


def test_ghost_clipping_gives_the_update_of_per_example_gradients(rows, fixed_secrets):
    hooks = make_spec(model={"kind": "mlp", "hidden": [32, 32]}, privacy={"max_grad_norm": 0.5},
                      training={"grad_sample_mode": "hooks"})
    ghost = make_spec(model={"kind": "mlp", "hidden": [32, 32]}, privacy={"max_grad_norm": 0.5},
                      training={"grad_sample_mode": "ghost", "physical_batch_size": 8})
    (plan_h, update_h), (plan_g, update_g) = train(hooks, rows), train(ghost, rows)
    assert plan_h == plan_g
    start = initial_state(hooks)
    for k in update_h:
        assert np.abs(update_h[k] - start[k]).max() > 1e-3  # the round moved the weights
        np.testing.assert_allclose(update_g[k], update_h[k], atol=1e-5)


def test_ghost_clipping_on_lora_layers_of_a_llama(tiny_llama, tmp_path, fixed_secrets):
    path = write_texts(tmp_path / "t.csv", sentences(48))
    hooks = llm_spec(tiny_llama, training={"batch_size": 16})
    ghost = llm_spec(tiny_llama, training={"batch_size": 16, "grad_sample_mode": "ghost", "physical_batch_size": 8})
    data = load_dataset(path, hooks)
    (plan_h, update_h), (plan_g, update_g) = train(hooks, data), train(ghost, data)
    assert plan_h == plan_g
    for k in update_h:
        np.testing.assert_allclose(update_g[k], update_h[k], atol=1e-5)


def test_bf16_on_lora_layers_trains_the_planned_round(tiny_llama, tmp_path):
    spec = llm_spec(tiny_llama, training={"batch_size": 16, "precision": "bf16", "physical_batch_size": 8})
    data = load_dataset(write_texts(tmp_path / "t.csv", sentences(48)), spec)
    plan, update = train(spec, data)
    start = initial_state(spec)
    assert plan.steps == batches_per_epoch(48, 16)
    assert all(u.dtype == np.float32 and np.isfinite(u).all() for u in update.values())
    assert any(np.abs(update[k] - start[k]).max() > 1e-4 for k in start)


def test_an_empty_shard_still_takes_every_noise_step_in_each_mode(rows, fixed_secrets):
    empty = TensorDataset(*(t[:0] for t in rows.tensors))
    for training in ({"grad_sample_mode": "hooks", "physical_batch_size": 8}, {"grad_sample_mode": "ghost"},
                     {"optimizer": "adam", "physical_batch_size": 8}):
        spec = make_spec(training=training)
        private = PrivateRound(spec, 150)  # the policy's declared size, whatever the rows
        update = private.train(empty, initial_state(spec))
        assert private.plan.steps == batches_per_epoch(150, 32) and np.isfinite(update.arrays["0.weight"]).all()


def test_bf16_autocast_runs_the_forward_pass_in_bf16_and_keeps_weights_in_float32(rows, monkeypatch):
    seen, build = [], dp_sgd.build_model

    def recording(spec):
        model = build(spec)
        model[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        return model
    monkeypatch.setattr(dp_sgd, "build_model", recording)
    _, update = train(make_spec(training={"precision": "bf16"}), rows)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(a.dtype == np.float32 for a in update.values())


def test_auto_takes_ghost_clipping_for_tabular_models_and_hooks_for_adapters(tiny_llama):
    assert dp_sgd.grad_sample_mode(make_spec(model={"kind": "mlp", "hidden": [8]})) == "ghost"
    assert dp_sgd.grad_sample_mode(make_spec()) == "ghost"
    assert dp_sgd.grad_sample_mode(llm_spec(tiny_llama)) == "hooks"
    assert dp_sgd.grad_sample_mode(make_spec(training={"grad_sample_mode": "hooks"})) == "hooks"


def test_the_device_is_what_the_job_asks_and_the_policy_allows():
    assert training_device("cpu", ["cpu"]).type == "cpu"
    assert training_device("auto", ["cpu"]).type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert training_device("auto", ["cpu", "cuda"]).type == expected
    with pytest.raises(FedtrainError, match="allows"):
        training_device("cpu", ["cuda"])
    if not torch.cuda.is_available():
        with pytest.raises(FedtrainError, match="no CUDA device"):
            training_device("cuda", ["cpu", "cuda"])


def test_a_node_refuses_a_device_its_policy_does_not_allow_or_it_does_not_have(tmp_path):
    from fedtrain.node.ledger import PrivacyLedger
    from fedtrain.policy import NodePolicy
    from nodes.admission import review

    ledger = PrivacyLedger(tmp_path / "ledger.db", max_epsilon=10.0, delta=1e-5)
    cpu_only = NodePolicy(max_epsilon=10.0, dataset_size=150, allowed_devices=["cpu"])
    refused = review(make_spec(training={"device": "cuda"}), cpu_only, ledger)
    assert [p.refusal.text() for p in refused] == ['device-not-allowed: training.device="cuda"']
    assert review(make_spec(training={"device": "auto"}), cpu_only, ledger) == []
    if not torch.cuda.is_available():
        anywhere = cpu_only.model_copy(update={"allowed_devices": ["cpu", "cuda"]})
        refused = review(make_spec(training={"device": "cuda"}), anywhere, ledger)
        assert [p.refusal.text() for p in refused] == ['device-unavailable: training.device="cuda"']
    ledger.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_round_trains_on_cuda_and_releases_cpu_arrays(rows):
    spec = make_spec(training={"device": "cuda", "precision": "bf16", "physical_batch_size": 8})
    private = PrivateRound(spec, len(rows), training_device("cuda", ["cuda"]))
    update = private.train(rows, initial_state(spec))
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in update.arrays.values())


def test_a_physical_batch_larger_than_the_logical_one_is_a_spec_error():
    from fedtrain.errors import SpecError

    with pytest.raises(SpecError, match="physical_batch_size"):
        make_spec(training={"batch_size": 16, "physical_batch_size": 32})


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def inner_steps(monkeypatch, spec, data, plan=None):
    """(the plan trained under, the gradient the job's own torch optimizer saw at each of its steps)."""
    cls, grads = OPTIMIZERS[spec.training.optimizer], []
    real = cls.step

    def recording(self, *args, **kwargs):
        grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).clone())
        return real(self, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(cls, "step", recording)
        private = PrivateRound(spec, len(data))
        private.plan = plan or private.plan
        private.train(data, initial_state(spec))
    return private.plan, grads


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_dp_adam_steps_only_on_the_privatised_gradient(rows, fixed_secrets, monkeypatch, optimizer):
    """Opacus wraps the job's optimizer: each Adam step sees the clipped, summed, noised gradient,
    once per logical batch (physical batches only accumulate), and the accountant records
    those steps (``train_round`` checks its history against the plan)."""
    extra = {"weight_decay": 0.01} if optimizer == "adamw" else {}
    training = {"optimizer": optimizer, "learning_rate": 0.01, "physical_batch_size": 8, **extra}
    plan, adam = inner_steps(monkeypatch, make_spec(training=training), rows)
    _, sgd = inner_steps(monkeypatch, make_spec(), rows)
    assert len(adam) == len(sgd) == plan.steps
    # The same seeds draw the same batch and noise: the first step's gradient is SGD's (to 1e-6).
    torch.testing.assert_close(adam[0], sgd[0], rtol=0, atol=1e-6)

    # Without noise and with every row in every batch, a privatised gradient is a mean of
    # per-example gradients clipped to C: its norm is at most C, far below the raw gradient's.
    c = 0.01
    spec = make_spec(training={**training, "batch_size": len(rows), "local_epochs": 3},
                     privacy={"max_grad_norm": c})
    quiet = PrivateRound(spec, len(rows)).plan
    plan, grads = inner_steps(monkeypatch, spec, rows, RoundPlan(0.0, quiet.sample_rate, quiet.steps))
    assert plan.sample_rate == 1 and len(grads) == 3
    assert all(0.5 * c < g.norm() <= c * (1 + 1e-5) for g in grads)


def test_peak_memory_falls_with_the_physical_batch(tmp_path):
    """Per-example gradients (hooks) of a logical batch of 1,024 rows of a 256-256-2 MLP hold
    1,024 x 66k floats (272 MB) at once; physical batches of 64 hold a sixteenth of that."""
    from bench.measure import node_round_rss
    from fedtrain.data import write_table

    features = [f"f{i}" for i in range(256)]
    rng = np.random.default_rng(0)
    shard = tmp_path / "rows.csv"
    write_table(shard, features, rng.normal(size=(1024, 256)), "y", rng.integers(0, 2, 1024))
    job = {"model": {"kind": "mlp", "hidden": [256]}, "data": {"features": features, "label": "y"}}
    training = {"rounds": 1, "batch_size": 1024, "grad_sample_mode": "hooks"}
    whole = node_round_rss(make_spec(**job, training=training), shard, tmp_path)
    split = node_round_rss(make_spec(**job, training={**training, "physical_batch_size": 64}), shard, tmp_path)
    assert whole - split > 150 * 2**20, (whole, split)
