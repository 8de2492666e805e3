"""LoRA fine-tuning across real node processes over loopback gRPC, and what leaves a node."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrain.demos.launch import LocalConsortium
from fedtrain.models import build_model, expected_manifest, load_dataset, load_trainable_state
from fedtrain.node.ledger import PrivacyLedger

from conftest import llm_spec, sentences, write_texts
from test_end_to_end import cli, wait_for, write_policy

pytestmark = pytest.mark.slow

# Per result: the ResultHeader (ids, DP metrics) plus each chunk's name, dtype, shape and offsets.
HEADER_BYTES = 512
PER_TENSOR_BYTES = 128


def run_job(tmp_path, spec, shards, policy):
    """``spec`` on a coordinator and a node process per shard; the final status, global model and
    the consortium (stopped) to read node state from; the model exported to ``tmp_path/adapter``."""
    out = tmp_path / "adapter"
    with LocalConsortium(tmp_path / "run", poll_seconds=1, eval_dir=tmp_path) as c:
        address = c.start_coordinator()
        c.enroll([f"n{i}" for i in range(len(shards))])
        for i, shard in enumerate(shards):
            c.start_node(f"n{i}", shard, policy)
        with c.client() as client:
            job_id = client.submit(spec)
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=300)
            assert status.state == "finished", status.error
            arrays = client.model(job_id)
        cli("job", "export", job_id, "--out", str(out), "--merged", "--coordinator", address,
            *c.security_args("operator"))
    return status, arrays, c


def assert_only_the_adapter_left(c, spec, status, nodes=3):
    """Bytes on the wire per node and round are the adapter's values plus a bounded header, and
    each node's audit log says it sent, per round, the three tensor-free protocol messages of
    secure aggregation and the adapter's update masked into one uint32 vector: never base
    weights or token ids. Each round is charged to its ledger, within the job's ε."""
    manifest = expected_manifest(spec)
    adapter_bytes = sum(t.nbytes for t in manifest.values())
    rounds = spec.training.rounds
    assert [r.round for r in status.rounds] == list(range(rounds + 1))
    for r in status.rounds[1:]:
        assert len(r.nodes) == nodes
        for n in r.nodes:
            assert not n.refusal
            assert adapter_bytes < n.bytes_received <= 1.05 * adapter_bytes + HEADER_BYTES + PER_TENSOR_BYTES * len(
                manifest)
    assert spec.secagg is not None
    elements = sum(int(np.prod(t.shape)) for t in manifest.values())
    for i in range(nodes):
        state = c.node_state(f"n{i}")
        audit = [json.loads(x) for x in cli("node", "audit", "--state-dir", str(state), "--json").stdout.splitlines()]
        sent = [e for e in audit if e["type"] == "SubmitResult"]
        assert len(sent) == rounds * 4
        masked = [e for e in sent if e["tensors"]]
        assert [e["round"] for e in masked] == list(range(1, rounds + 1))
        for e in masked:
            assert e["tensors"] == [{"name": "secagg.masked", "dtype": "uint32", "shape": [1 + elements]}]
        stages = [e["detail"].split(":")[0] for e in sent if not e["tensors"]]
        assert stages == ["secagg setup", "secagg share keys", "secagg unmask"] * rounds
        assert "audit log intact" in cli("node", "audit", "verify", "--state-dir", str(state)).stdout
        ledger = PrivacyLedger(state / "ledger.db", max_epsilon=10.0, delta=1e-5)
        rows = ledger.rows(status.job_id)
        assert [r.round for r in rows] == list(range(1, rounds + 1)) and ledger.spent() <= spec.privacy.epsilon + 1e-6
        ledger.close()


def assert_the_export_computes_the_coordinators_logits(spec, arrays, base, out, inputs):
    """The exported adapter loads with peft's own PeftModel.from_pretrained, and the merged model
    with transformers alone, and both compute what the coordinator's global model computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = build_model(spec)
    load_trainable_state(ours, arrays)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    ids, mask = inputs
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids, attention_mask=mask).logits, expected)
        torch.testing.assert_close(merged.eval()(input_ids=ids, attention_mask=mask).logits, expected,
                                   rtol=1e-4, atol=1e-4)


def test_three_nodes_fine_tune_a_tiny_llm_and_only_the_adapter_leaves(tmp_path, tiny_llama):
    spec = llm_spec(tiny_llama, min_nodes=3, training={"rounds": 2, "local_epochs": 2},
                    evaluation={"data": str(write_texts(tmp_path / "test.csv", sentences(64, seed=9)))})
    shards = [write_texts(tmp_path / f"shard-{i}.csv", sentences(120, seed=i)) for i in range(3)]
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=10.0, allowed_tasks=["causal-lm"],
                          allowed_models=["transformer"], allowed_base_models=[spec.model.sha256],
                          model_roots=[str(tiny_llama.parent)], dataset_size=120)
    status, arrays, c = run_job(tmp_path, spec, shards, policy)
    losses = [r.metrics["loss"] for r in status.rounds]
    assert losses[2] < losses[0] - 0.1, losses
    assert_only_the_adapter_left(c, spec, status)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert spec.model.sha256 in card and "| n0 | 2 |" in card and "| rounds | 2 of 2" in card
    assert_the_export_computes_the_coordinators_logits(spec, arrays, tiny_llama, tmp_path / "adapter",
                                                       load_dataset(tmp_path / "test.csv", spec).tensors)


def test_three_nodes_instruction_tune_smollm2_under_secure_aggregation(tmp_path, tiny_smollm2):
    """SmolLM2-135M-Instruct's real embeddings, tokenizer and chat template (2 of its 30 layers):
    one DP round over three node processes lowers the response loss on held-out pairs."""
    from test_instruction_tuning import TWEETS, sft_spec, write_pairs

    spec = sft_spec(tiny_smollm2, batch_size=8, physical_batch_size=4, local_epochs=3, learning_rate=0.5)
    spec = spec.model_validate({**spec.model_dump(), "min_nodes": 3, "secure_aggregation": {"enabled": True},
                                "evaluation": {"data": str(write_pairs(tmp_path / "test.csv", TWEETS))}})
    shards = [write_pairs(tmp_path / f"shard-{i}.csv", TWEETS * 4) for i in range(3)]
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=10.0, allowed_tasks=["instruction-tuning"],
                          allowed_base_models=[spec.model.sha256], model_roots=[str(tiny_smollm2.parent)],
                          dataset_size=24)
    status, arrays, c = run_job(tmp_path, spec, shards, policy)
    before, after = (dict(r.metrics) for r in status.rounds)
    assert set(after) == {"loss", "perplexity", "accuracy"}
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert_only_the_adapter_left(c, spec, status)
    # The report shows what the model answers to the coordinator's own first evaluation prompts.
    examples = json.loads((Path(status.report_path).parent / "report.json").read_text())["examples"]
    assert [e["expected"] for e in examples] == [a for _, a in TWEETS[:3]]
    assert all(e["prompt"].endswith(f"{t}\nassistant") and e["before"] for e, (t, _) in zip(examples, TWEETS))
    ids, mask, _ = load_dataset(tmp_path / "test.csv", spec).tensors
    assert_the_export_computes_the_coordinators_logits(spec, arrays, tiny_smollm2, tmp_path / "adapter", (ids, mask))


def test_minilm_sentiment_classification_on_a_slice_of_real_tweets(tmp_path):
    from fedtrain.demos.text import NODES, text_spec, write_text_shards

    shards, test = write_text_shards(tmp_path, per_node=32, test_size=48)
    spec = text_spec(test, rounds=1, epsilon=8.0).model_copy(deep=True)
    spec = spec.model_validate({**spec.model_dump(), "model": {**spec.model.model_dump(), "max_length": 16},
                                "training": {**spec.training.model_dump(), "batch_size": 16}})
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=10.0, dataset_size=32)
    with LocalConsortium(tmp_path / "run", poll_seconds=1, eval_dir=tmp_path) as c:
        address = c.start_coordinator()
        c.enroll(list(NODES))
        for name, shard in zip(NODES, shards):
            c.start_node(name, shard, policy)
        with c.client() as client:
            job_id = client.submit(spec)
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=240)
        assert status.state == "finished", status.error
        evaluated = json.loads(cli("job", "eval", job_id, "--data", str(test), "--round", "1", "--json",
                                   "--coordinator", address, *c.security_args("operator")).stdout)
    # The operator's evaluation of the fetched adapter is the coordinator's own, on the same file.
    assert evaluated["round"] == 1
    assert evaluated["accuracy"] == pytest.approx(status.rounds[1].metrics["accuracy"])
    assert evaluated["loss"] == pytest.approx(status.rounds[1].metrics["loss"], rel=1e-4)
    manifest = expected_manifest(spec)
    assert any("classifier" in k for k in manifest) and all("lora_" in k or "classifier" in k for k in manifest)
    adapter_bytes = sum(t.nbytes for t in manifest.values())
    for n in status.rounds[1].nodes:
        assert n.bytes_received <= 1.05 * adapter_bytes + HEADER_BYTES + PER_TENSOR_BYTES * len(manifest)
