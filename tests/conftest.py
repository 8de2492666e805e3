import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from fedtrain.data import write_table
from fedtrain.spec import parse_job_spec

FEATURES = ["mean radius", "mean texture", "mean smoothness", "worst area"]


@pytest.fixture(scope="session")
def cancer():
    d = load_breast_cancer()
    cols = [list(d.feature_names).index(f) for f in FEATURES]
    return d.data[:, cols], 1 - d.target


@pytest.fixture
def shards(tmp_path, cancer):
    """Three disjoint node shards and a test set of real breast-cancer rows."""
    x, y = cancer
    order = np.random.default_rng(0).permutation(len(y))
    test_idx, train_idx = order[:100], order[100:]
    paths = []
    for i, idx in enumerate(np.array_split(train_idx, 3)):
        p = tmp_path / f"shard-{i}.csv"
        write_table(p, FEATURES, x[idx], "malignant", y[idx])
        paths.append(p)
    test = tmp_path / "test.csv"
    write_table(test, FEATURES, x[test_idx], "malignant", y[test_idx])
    return paths, test


def make_spec(**over):
    base = {
        "name": "test-job",
        "data": {"features": FEATURES, "label": "malignant"},
        "training": {"rounds": 2, "batch_size": 32, "learning_rate": 0.5},
        "privacy": {"epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": 1,
    }
    return make_spec_from(base, over)


# --- transformer fixtures: a tiny random-init Llama saved like any HF checkpoint -------------

WORDS = {"who": ["the cat", "a dog", "my bird", "the fox"], "does": ["sat on", "ran to", "looked at", "slept by"],
         "what": ["the mat", "a door", "the tree", "my bed"]}


def sentences(n, seed=0):
    """Text with structure a tiny LM can learn in a few DP steps."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS[k]) for k in ("who", "does", "what")) + " ." for _ in range(n)]


def write_texts(path, texts, labels=None):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text"] + (["label"] if labels is not None else []))
        for i, t in enumerate(texts):
            w.writerow([t] + ([labels[i]] if labels is not None else []))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A ~0.3M-parameter Llama with a word-level tokenizer, written with save_pretrained (safetensors)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences(200), trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def llm_spec(base, **over):
    from fedtrain.models.transformer import weights_digest

    spec = {
        "name": "tiny-lm", "task": "causal-lm",
        "model": {"kind": "transformer", "base": str(base), "sha256": weights_digest(base), "max_length": 12},
        "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
        "data": {"text": "text"},
        "training": {"rounds": 2, "batch_size": 16, "learning_rate": 0.5},
        "privacy": {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": 1,
    }
    return make_spec_from(spec, over)


def make_spec_from(base, over):
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return parse_job_spec(base)
