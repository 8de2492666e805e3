"""`fedtrain simulate`'s partitions and checks (tests/test_readme.py runs the command itself)."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrain.demos.tabular import demo_spec, write_shards
from fedtrain.errors import FedtrainError, SpecError
from fedtrain.models import load_dataset
from fedtrain.simulation import partition_rows, simulate, write_partitions
from fedtrain.spec import parse_job_spec


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean distance of each partition's label share from the whole set's."""
    overall = labels.mean()
    return float(np.mean([abs(labels[p].mean() - overall) for p in parts]))


def test_partitions_cover_every_row_once():
    labels = np.random.default_rng(0).integers(0, 2, 1000)
    iid = partition_rows(labels.tolist(), 20, "iid")
    skewed = partition_rows(labels.tolist(), 20, "dirichlet", alpha=0.3, min_size=5)
    for parts in (iid, skewed):
        rows = np.concatenate(parts)
        assert len(rows) == len(set(rows.tolist())) == 1000
    assert {len(p) for p in iid} == {50}
    assert min(len(p) for p in skewed) >= 5
    # A small alpha gives each node a few labels: far from the IID shares.
    assert label_skew(labels, skewed) > 3 * label_skew(labels, iid)
    # The same seed gives the same partitions; another seed others.
    assert all(np.array_equal(a, b) for a, b in zip(skewed, partition_rows(labels.tolist(), 20, "dirichlet", 0.3,
                                                                            min_size=5)))
    assert not all(np.array_equal(a, b) for a, b in zip(iid, partition_rows(labels.tolist(), 20, "iid", seed=1)))


def test_partition_errors_name_the_problem():
    with pytest.raises(SpecError, match="10 rows cannot give 20 nodes"):
        partition_rows([0, 1] * 5, 20)
    with pytest.raises(SpecError, match="unknown partition scheme 'zipf'"):
        partition_rows([0, 1] * 5, 2, "zipf")
    with pytest.raises(SpecError, match="raise alpha or simulate fewer nodes"):
        partition_rows([0] * 95 + [1] * 5, 20, "dirichlet", alpha=0.01, min_size=4)


def test_partition_files_are_node_tables(tmp_path):
    columns, shards, test = write_shards(tmp_path, 1)
    spec = demo_spec(columns, test, rounds=1, epsilon=1.0)
    train = tmp_path / "train.csv"
    sizes = write_partitions(train, spec, 7, tmp_path / "parts", "dirichlet", alpha=1.0)
    assert sum(sizes) == len(load_dataset(train, spec))
    assert [len(load_dataset(tmp_path / "parts" / f"{i}.csv", spec)) for i in range(7)] == sizes


def test_simulation_refuses_what_it_cannot_run(tmp_path):
    columns, _, test = write_shards(tmp_path, 1)
    spec = demo_spec(columns, test, rounds=1, epsilon=1.0)  # min_nodes 3
    with pytest.raises(SpecError, match="min_nodes=3 per round; simulate at least that many"):
        simulate(spec, tmp_path / "train.csv", 2, tmp_path / "work")
    with pytest.raises(FedtrainError, match="more than this machine's"):
        simulate(spec, tmp_path / "train.csv", 3, tmp_path / "work", cpus_per_node=1000)
    other_label = parse_job_spec({**spec.model_dump(mode="json"), "data": {"features": columns, "label": "y"}})
    with pytest.raises(SpecError, match="missing label column 'y'"):
        write_partitions(tmp_path / "train.csv", other_label, 3, tmp_path / "p")


def test_a_round_that_every_virtual_node_fails_alike_stops_the_rehearsal(tmp_path):
    """A job that no partition can run: its failures are counted by reason, and the rehearsal
    stops after the first round with that reason instead of running the other two."""
    columns, _, test = write_shards(tmp_path, 1)
    spec = parse_job_spec({**demo_spec(columns, test, rounds=3, epsilon=1.0).model_dump(mode="json"),
                           "data": {"features": ["no such column"], "label": "malignant"},
                           "evaluation": None, "round_retries": 0})
    rounds = []
    with pytest.raises(FedtrainError, match=r"every virtual node failed in round 1 with the same error, so the"
                       r" rehearsal stopped after round 1 of 3: its partition: missing column\(s\) \['no such"):
        simulate(spec, tmp_path / "train.csv", 3, tmp_path / "work", on_round=rounds.append)
    (only,) = rounds
    assert only.nodes == 0 and only.given_up
    (reason, count), = only.failed.items()
    assert count == 3 and reason.startswith("its partition: missing column(s) ['no such column']")
    assert "ClientAppException" in (tmp_path / "work" / "flower.log").read_text()


def test_a_table_that_cannot_be_read_is_named(tmp_path):
    columns, _, test = write_shards(tmp_path, 1)
    spec = demo_spec(columns, test, rounds=1, epsilon=1.0)
    (tmp_path / "broken.jsonl").write_text('{"malignant": 1}\n{not json\n')
    with pytest.raises(SpecError, match="broken.jsonl cannot be read as .jsonl"):
        write_partitions(tmp_path / "broken.jsonl", spec, 3, tmp_path / "p")
    with pytest.raises(SpecError, match="unknown data format '.xlsx'"):
        (tmp_path / "t.xlsx").write_text("")
        write_partitions(tmp_path / "t.xlsx", spec, 3, tmp_path / "p")
