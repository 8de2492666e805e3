"""Reading a node's local table. The data never leaves the process that reads it."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtrain.errors import SpecError
from fedtrain.sources import DatabaseSource, DataSource
from fedtrain.spec import DataSpec, InstructionDataSpec, TextDataSpec


@dataclass(frozen=True)
class Table:
    features: np.ndarray  # float32, (n, d)
    labels: np.ndarray  # int64, (n,)

    def __len__(self) -> int:
        return len(self.labels)


class DataCheck:
    """What reading a node's data for a job found wrong, for its owner's eyes only.

    A node reads its data with one of these (the coordinator and the tools read theirs
    strictly, where the first problem raises): bad rows are skipped and an unreadable
    file reads as no rows, so that nothing the node does next, and nothing it sends,
    depends on what is wrong with its data. Skipping a row depends on that row alone,
    which keeps DP's one-row sensitivity. The problems go to the node's local log and
    to ``fedtrain node jobs --show``, never to the coordinator.
    """

    KEPT = 20  # problems kept verbatim; the rest are counted

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.count = 0

    def add(self, problem: str) -> None:
        self.count += 1
        if len(self.problems) < self.KEPT:
            self.problems.append(problem)

    def summary(self) -> str:
        more = f" (and {self.count - len(self.problems)} more)" if self.count > len(self.problems) else ""
        return "; ".join(self.problems) + more


def note_problem(check: DataCheck | None, message: str) -> None:
    """Raise (strict reading) or note and go on (a node reading its own data)."""
    if check is None:
        raise SpecError(message)
    check.add(message)


def load_table(path: DataSource | str, spec: DataSpec, num_classes: int, check: DataCheck | None = None) -> Table:
    """Read ``spec``'s columns from a node's table (a file or a database) and scale them with
    the spec's public constants.

    Without ``check`` the first problem raises, naming the bad cell; with it, bad rows are skipped.
    """
    columns = _read_columns_or_note(path, [*spec.features, spec.label], check)
    xs: list[list[float]] = []
    ys: list[int] = []
    for row, values in enumerate(zip(*columns.values()), start=1):
        cells = dict(zip(columns, values))
        problem = _bad_cell(cells, spec, num_classes)
        if problem:
            note_problem(check, f"{path}, row {row}: {problem}")
            continue
        xs.append([float(cells[c]) for c in spec.features])
        ys.append(int(float(cells[spec.label])))
    if not ys and check is None:
        raise SpecError(f"{path} has no rows")
    features = np.asarray(xs, dtype=np.float32).reshape(len(ys), len(spec.features))
    if spec.scaling is not None:
        features = (features - np.asarray(spec.scaling.mean)) / np.asarray(spec.scaling.std)
    return Table(features=features.astype(np.float32), labels=np.asarray(ys, dtype=np.int64))


def _bad_cell(cells: dict, spec: DataSpec, num_classes: int) -> str | None:
    """What is wrong with a row of a table, naming the column and what it should hold (for the owner only)."""
    for column in spec.features:
        try:
            value = float(cells[column])
        except (TypeError, ValueError):
            return f"feature column {column!r} holds {cells[column]!r}, not a number"
        if not math.isfinite(value):
            return f"feature column {column!r} holds {cells[column]!r}; features must be finite numbers"
    label = cells[spec.label]
    try:
        index = float(label)
    except (TypeError, ValueError):
        index = math.nan
    if not (index.is_integer() and 0 <= index < num_classes):
        return (f"label column {spec.label!r} holds {label!r}, not a class index: tabular labels are the integers"
                f" 0..{num_classes - 1} (model.num_classes is {num_classes}); map class names to them")
    return None


def write_table(path: str | Path, columns: list[str], features: np.ndarray, label: str, labels: np.ndarray) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*columns, label])
        for x, y in zip(features.tolist(), labels.tolist()):
            w.writerow([*x, int(y)])


@dataclass(frozen=True)
class TextTable:
    texts: list[str]
    labels: np.ndarray | None  # int64 class indices; None for causal-lm

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class PairTable:
    prompts: list[str]
    responses: list[str]
    rows: list[int]  # each pair's row in its file (1 = the first after a header), for the owner's log
    source: str      # the file, for the owner's log

    def __len__(self) -> int:
        return len(self.prompts)


def data_format(path: Path) -> str:
    """The suffix that says how a local data file is read: .csv, .jsonl (or .json) or .parquet."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise SpecError(f"data file {path} does not exist")
    if suffix not in (".csv", ".jsonl", ".json", ".parquet"):
        raise SpecError(f"{path}: unknown data format {suffix!r}; use .csv, .jsonl or .parquet")
    return suffix


def read_arrow(path: Path):
    """A whole local data file as a pyarrow table (``fedtrain simulate`` cuts it into partitions)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    readers = {".csv": pacsv.read_csv, ".jsonl": pajson.read_json, ".json": pajson.read_json,
               ".parquet": pq.read_table}
    suffix = data_format(path)
    try:
        return readers[suffix](path)
    except pa.ArrowInvalid as err:
        raise SpecError(f"{path} cannot be read as {suffix}: {err}") from None


def write_arrow(table, path: Path) -> None:
    """Write a pyarrow table in the format ``path``'s suffix names."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if suffix == ".csv":
        pacsv.write_csv(table, path)
    elif suffix == ".parquet":
        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))


def read_columns(path: DataSource | str, columns: list[str]) -> dict[str, list]:
    """``columns`` of a database's result, or of a local CSV, JSONL or Parquet file (chosen by its suffix)."""
    if isinstance(path, DatabaseSource):
        return path.read_columns(columns)
    path = Path(path)
    suffix = data_format(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise SpecError(f"{path}: missing column(s) {missing}; the file has {table.column_names}")
        return {c: table.column(c).to_pylist() for c in columns}
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        rows.append(json.loads(text))
                    except json.JSONDecodeError as err:
                        raise SpecError(f"{path}, line {line}: not a JSON object ({err.msg})") from None
        header = sorted({k for r in rows if isinstance(r, dict) for k in r})
    else:
        try:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows, header = list(reader), reader.fieldnames or []
        except UnicodeDecodeError as err:
            raise SpecError(f"{path} is not UTF-8 ({err.reason} at byte {err.start}); re-encode it as UTF-8") from None
        except csv.Error as err:
            raise SpecError(f"{path} cannot be read as CSV: {err}") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise SpecError(f"{path}: missing column(s) {missing}; the file has {header}")
    return {c: [r.get(c) if isinstance(r, dict) else None for r in rows] for c in columns}


def _read_columns_or_note(path: DataSource | str, columns: list[str], check: DataCheck | None) -> dict[str, list]:
    """``read_columns``, or (a node reading its own data) no rows and a note for the owner."""
    try:
        return read_columns(path, columns)
    except (SpecError, OSError, ValueError) as err:  # ValueError: e.g. pyarrow's ArrowInvalid
        note_problem(check, str(err) if isinstance(err, SpecError) else f"{path} cannot be read: {err}")
        return {c: [] for c in columns}


def load_text(path: DataSource | str, spec: TextDataSpec, check: DataCheck | None = None) -> TextTable:
    """Read the text (and label) column of a local file; without ``check`` the first bad row
    raises, with it bad rows are skipped."""
    columns = _read_columns_or_note(path, [spec.text] + ([spec.label] if spec.label else []), check)
    index = {c: i for i, c in enumerate(spec.classes or [])}
    labels = columns.get(spec.label) if spec.label is not None else None
    texts, ys = [], []
    for row, t in enumerate(columns[spec.text], start=1):
        if not isinstance(t, str) or not t.strip():
            note_problem(check, f"{path}, row {row}: column {spec.text!r} is empty or not text")
            continue
        if labels is not None:
            # CSV gives strings, JSONL and Parquet may give numbers: compare as text.
            key = str(labels[row - 1])
            if key not in index:
                note_problem(check, f"{path}, row {row}: label column {spec.label!r} holds {labels[row - 1]!r},"
                                f" not one of the job's classes {spec.classes}")
                continue
            ys.append(index[key])
        texts.append(t)
    if not texts and check is None:
        raise SpecError(f"{path} has no rows")
    return TextTable(texts=texts, labels=None if labels is None else np.asarray(ys, dtype=np.int64))


def load_pairs(path: DataSource | str, spec: InstructionDataSpec, check: DataCheck | None = None) -> PairTable:
    """Read the prompt and response columns of a local file; without ``check`` the first bad
    row raises, with it bad rows are skipped."""
    columns = _read_columns_or_note(path, [spec.prompt, spec.response], check)
    prompts, responses, rows = [], [], []
    for row, (prompt, response) in enumerate(zip(columns[spec.prompt], columns[spec.response]), start=1):
        bad = [c for c, v in ((spec.prompt, prompt), (spec.response, response)) if not isinstance(v, str) or not v.strip()]
        if bad:
            note_problem(check, f"{path}, row {row}: column(s) {bad} empty or not text")
            continue
        prompts.append(prompt)
        responses.append(response)
        rows.append(row)
    if not prompts and check is None:
        raise SpecError(f"{path} has no rows")
    return PairTable(prompts, responses, rows, str(path))
