"""Reading a node's local table. The data never leaves the process that reads it."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtrain.errors import SpecError
from fedtrain.spec import DataSpec


@dataclass(frozen=True)
class Table:
    features: np.ndarray  # float32, (n, d)
    labels: np.ndarray  # int64, (n,)

    def __len__(self) -> int:
        return len(self.labels)


def load_table(path: str | Path, spec: DataSpec, num_classes: int) -> Table:
    """Read ``spec``'s columns from a CSV file, with errors that name the bad cell."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in [*spec.features, spec.label] if c not in header]
            if missing:
                raise SpecError(f"{path}: missing column(s) {missing}; the file has {header}")
            xs, ys = [], []
            for line, row in enumerate(reader, start=2):
                try:
                    xs.append([float(row[c]) for c in spec.features])
                    label = float(row[spec.label])
                except (TypeError, ValueError):
                    raise SpecError(f"{path}, line {line}: a feature or label is not a number") from None
                if not label.is_integer() or not 0 <= label < num_classes:
                    raise SpecError(
                        f"{path}, line {line}: label {row[spec.label]!r} is not a class index in 0..{num_classes - 1}"
                    )
                ys.append(int(label))
    except FileNotFoundError:
        raise SpecError(f"data file {path} does not exist") from None
    if not ys:
        raise SpecError(f"{path} has no rows")
    features = np.asarray(xs, dtype=np.float32)
    if not np.isfinite(features).all():
        raise SpecError(f"{path}: features contain NaN or infinite values")
    if spec.standardize:
        std = features.std(axis=0)
        features = (features - features.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return Table(features=features.astype(np.float32), labels=np.asarray(ys, dtype=np.int64))


def write_table(path: str | Path, columns: list[str], features: np.ndarray, label: str, labels: np.ndarray) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, label])
        for x, y in zip(features.tolist(), labels.tolist()):
            w.writerow([*x, int(y)])
