"""LoRA fine-tuning across real node processes over loopback gRPC, and what leaves a node."""

import json

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


def test_three_nodes_fine_tune_a_tiny_llm_and_only_the_adapter_leaves(tmp_path, tiny_llama):
    spec = llm_spec(tiny_llama, min_nodes=3, training={"rounds": 2, "local_epochs": 2},
                    evaluation={"data": str(write_texts(tmp_path / "test.csv", sentences(64, seed=9)))})
    shards = [write_texts(tmp_path / f"shard-{i}.csv", sentences(120, seed=i)) for i in range(3)]
    policy = write_policy(tmp_path / "policy.yaml", max_epsilon=10.0, allowed_tasks=["causal-lm"],
                          allowed_models=["transformer"], allowed_base_models=[spec.model.sha256],
                          model_roots=[str(tiny_llama.parent)], dataset_size=120)
    out = tmp_path / "adapter"
    with LocalConsortium(tmp_path / "run", poll_seconds=1, eval_dir=tmp_path) as c:
        address = c.start_coordinator()
        c.enroll([f"n{i}" for i in range(len(shards))])
        for i, shard in enumerate(shards):
            c.start_node(f"n{i}", shard, policy)
        with c.client() as client:
            job_id = client.submit(spec)
            status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=240)
            assert status.state == "finished", status.error
            arrays = client.model(job_id)
        cli("job", "export", job_id, "--out", str(out), "--merged", "--coordinator", address,
            *c.security_args("operator"))

    losses = [r.metrics["loss"] for r in status.rounds]
    assert [r.round for r in status.rounds] == [0, 1, 2]
    assert losses[2] < losses[0] - 0.1, losses

    # Bytes on the wire per node and round: the adapter's values plus a bounded header.
    manifest = expected_manifest(spec)
    adapter_bytes = sum(t.nbytes for t in manifest.values())
    for r in status.rounds[1:]:
        assert len(r.nodes) == 3
        for n in r.nodes:
            assert not n.refusal
            assert adapter_bytes < n.bytes_received <= 1.05 * adapter_bytes + HEADER_BYTES + PER_TENSOR_BYTES * len(
                manifest)

    # What each node's audit log says it sent (3 nodes: secure aggregation is on): per round, the
    # three tensor-free protocol messages, and the adapter's update masked into one uint32 vector,
    # never base weights or token ids.
    assert spec.secagg is not None
    elements = sum(int(np.prod(t.shape)) for t in manifest.values())
    for i in range(3):
        state = c.node_state(f"n{i}")
        audit = [json.loads(x) for x in cli("node", "audit", "--state-dir", str(state), "--json").stdout.splitlines()]
        sent = [e for e in audit if e["type"] == "SubmitResult"]
        assert len(sent) == 2 * 4
        masked = [e for e in sent if e["tensors"]]
        assert [e["round"] for e in masked] == [1, 2]
        for e in masked:
            assert e["tensors"] == [{"name": "secagg.masked", "dtype": "uint32", "shape": [1 + elements]}]
        stages = [e["detail"].split(":")[0] for e in sent if not e["tensors"]]
        assert stages == ["secagg setup", "secagg share keys", "secagg unmask"] * 2
        assert "audit log intact" in cli("node", "audit", "verify", "--state-dir", str(state)).stdout
        ledger = PrivacyLedger(state / "ledger.db", max_epsilon=10.0, delta=1e-5)
        assert [r.round for r in ledger.rows(job_id)] == [1, 2] and ledger.spent() <= 8.0 + 1e-6
        ledger.close()

    # The exported adapter loads with the standard tools and computes what the coordinator's model computes.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    card = (out / "README.md").read_text()
    assert spec.model.sha256 in card and "| n0 | 2 |" in card and "| rounds | 2 of 2" in card
    ids = load_dataset(tmp_path / "test.csv", spec).tensors
    ours = build_model(spec)
    load_trainable_state(ours, arrays)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids[0], attention_mask=ids[1]).logits
        torch.testing.assert_close(loaded.eval()(input_ids=ids[0], attention_mask=ids[1]).logits, expected)
        torch.testing.assert_close(merged.eval()(input_ids=ids[0], attention_mask=ids[1]).logits, expected,
                                   rtol=1e-4, atol=1e-4)


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
