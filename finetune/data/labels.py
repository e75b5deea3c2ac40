"""Label files (``data.labels``): a CSV or TSV of image paths and labels, read into the very datasets a folder tree
gives for the same images.

The columns (their names set by ``data.columns``) are ``path``, relative to ``data.root`` (by default the label
file's folder); ``label``, with ``model.task: multilabel`` any number of labels split by ``data.label_delim``, none
for a negative image; and optionally ``split``: ``train``, ``val``, or ``test``, which training leaves for
``finetune evaluate --split test``. Without a split column the stratified ``data.val_fraction`` split applies.

This module reads and checks the file and gives (path, target) samples; :mod:`finetune.data.folders` makes them the
datasets a tree gives. Samples are ordered as ImageFolder orders a tree, by class name and then path (multi-label:
by path), so the order of the lines does not matter and a file that lists a tree gives the run that tree gives.

A path outside ``data.root`` (an absolute path elsewhere, or one that climbs out with ``..``) is refused, so a label
file from someone else cannot make finetune read arbitrary files. Every problem is an error naming the file and
line; nothing is read further, nothing is written.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from finetune.config.schema import Config
from finetune.errors import FinetuneError, Problem

SPLITS = ("train", "val", "test")
SHOWN = 5  # problems of one kind named in a message; the rest are counted
TAB_SUFFIXES = (".tsv", ".tab")
DELIMITERS = (",", "\t", ";")  # what a header line of another suffix may be split by, in this order


@dataclass(frozen=True)
class Row:
    line: int  # where the row starts in the file (1-based; the header is line 1)
    path: str  # the image file: data.root joined with the path as written, normalised
    labels: tuple[str, ...]  # one for multiclass; any number, none included, for multilabel
    split: Optional[str]  # train, val or test; None without a split column


@dataclass
class LabelTable:
    """The rows of a label file, checked: paths inside data.root, known splits, each image once."""

    file: Path
    rows: list[Row]
    split_column: bool

    def rows_of(self, split: str) -> list[Row]:
        """The rows of ``split``; without a split column every row is a training (train or val) row."""
        if not self.split_column:
            return list(self.rows) if split == "train" else []
        return [row for row in self.rows if row.split == split]


def read_label_file(config: Config) -> LabelTable:
    """Read and check ``data.labels``: encoding, columns, paths, split values, repeated images.

    Raises FinetuneError naming the file, and the lines at fault (the first few, with the count).
    """
    file = Path(config.data.labels)
    if not file.is_file():
        raise FinetuneError(f"Label file not found: {file}. Check the path: in a config file it is relative to the "
                            "file's folder.")
    text = _decode(file)
    delimiter = "\t" if file.suffix.lower() in TAB_SUFFIXES else next(
        (d for d in DELIMITERS if d in text.partition("\n")[0]), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in next(reader, [])]
    if not any(header):
        raise FinetuneError(f"Label file {file} is empty; its first line must name the columns, e.g. "
                            "path,label,split, and each further line one image.")
    columns = _columns(config, file, header)
    rows, problems, seen = [], [], {}
    line = reader.line_num
    for record in reader:
        start, line = line + 1, reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        row = _row(config, columns, record, start, problems)
        if row is None:
            continue
        first = seen.setdefault(row.path, row)
        if first is not row and (set(first.labels), first.split) != (set(row.labels), row.split):
            problems.append((start, f"{_shown(row.path, config)} again, with {_describe(row)}; line {first.line} "
                             f"gave it {_describe(first)}. Give each image one row"
                             + (" with all its labels" if config.model.task == "multilabel" else "")))
        elif first is row:
            rows.append(row)
    _raise(file, problems, ("problem", "problems"), "Fix these lines of the label file.")
    if not rows:
        raise FinetuneError(f"Label file {file} has no rows, only its header; add one line per image.")
    return LabelTable(file, rows, "split" in columns)


def _decode(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write it, is not part of the header
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise FinetuneError(f"Label file {file} is not UTF-8 text: line {line} holds the byte "
                            f"0x{data[exc.start]:02x}. Save it as UTF-8 (spreadsheets: CSV UTF-8).") from None


def _columns(config: Config, file: Path, header: list[str]) -> dict[str, int]:
    """The index of each column used: path and label always, split when the file has it."""
    names = config.data.columns
    found, missing = {}, []
    for role in ("path", "label", "split"):
        name = getattr(names, role) or role  # a split column named in the config must exist; "split" may
        if name in header:
            found[role] = header.index(name)
        elif role != "split" or names.split:
            missing.append(f"{role} ({name!r})")
    if missing:
        raise FinetuneError(f"Label file {file} lacks the column(s) {', '.join(missing)}: its header (line 1) has "
                            f"{', '.join(map(repr, header))}. Rename them, or map yours with data.columns, e.g. "
                            "--set 'data.columns={path: image, label: class}'.")
    return found


def _row(config: Config, columns: dict[str, int], record: list[str], line: int, problems: list) -> Optional[Row]:
    """The row of ``record``, or None with its problem added to ``problems``."""
    if len(record) <= max(columns.values()):
        problems.append((line, f"has {len(record)} field(s), too few for the header's columns"))
        return None
    written = record[columns["path"]].strip()
    cell = record[columns["label"]].strip()
    split = record[columns["split"]].strip().lower() if "split" in columns else None
    if config.model.task == "multilabel":
        labels = tuple(dict.fromkeys(label.strip() for label in cell.split(config.data.label_delim) if label.strip()))
    else:
        labels = (cell,)
    path = _inside_root(config, written)
    why = ("has no image path" if not written else
           f"names {written}, outside data.root {config.data.root}: paths must stay inside it" if path is None else
           "has no label (model.task: multilabel allows images without labels)" if labels == ("",) else
           f"has split {split!r}; use train, val or test" if split is not None and split not in SPLITS else None)
    if why:
        problems.append((line, why))
        return None
    return Row(line, path, labels, split)


def _inside_root(config: Config, written: str) -> Optional[str]:
    """``written`` joined with data.root and normalised, or None when it leaves data.root."""
    root = os.path.normpath(config.data.root)
    path = os.path.normpath(os.path.join(root, written))  # an absolute ``written`` stays as it is
    return path if path.startswith(root.rstrip(os.sep) + os.sep) else None


def _describe(row: Row) -> str:
    labels = f"label {' '.join(row.labels)!r}" if row.labels else "no label"
    return labels + (f" in split {row.split}" if row.split else "")


def _shown(path: str, config: Config) -> str:
    return os.path.relpath(path, config.data.root)


def _raise(file: Path, problems: list[tuple[int, str]], nouns: tuple[str, str], fix: str) -> None:
    """A FinetuneError listing the first few ``problems`` (line, text) of ``file`` and counting them all; ``nouns``:
    what one and several of them are called."""
    if not problems:
        return
    problems = sorted(problems)
    shown = "".join(f"\n  line {line}: {text}" for line, text in problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    raise FinetuneError(f"Label file {file}: {len(problems)} {nouns[len(problems) > 1]}:{shown}{more}\n{fix}")


def label_classes(config: Config, table: Optional[LabelTable] = None) -> list[str]:
    """The classes of a label file: ``data.classes``, or the sorted labels of its training rows.

    Raises FinetuneError for a label that ``data.classes`` lacks or that no training row has (seen only in val or
    test), and for a class without a training image.
    """
    table = table or read_label_file(config)
    trained = {label for row in table.rows_of("train") for label in row.labels}
    classes = config.data.classes or sorted(trained)
    known = set(classes)
    unknown = [(row.line, f"label {label!r} " + (f"is not in data.classes ({config.where('data.classes')})"
                                                 if config.data.classes else f"appears only in {row.split}"))
               for row in table.rows for label in row.labels if label not in known]
    fix = ("Add the label to data.classes, fix it, or remove the row." if config.data.classes else
           "Every label needs training images (split train): add some, fix the label, or remove the row.")
    _raise(table.file, unknown, ("unknown label", "unknown labels"), fix)
    untrained = [name for name in classes if name not in trained]
    if untrained:
        raise FinetuneError(f"Label file {table.file}: no training image has the class(es) {', '.join(untrained)} "
                            f"of data.classes; add training rows for them or leave them out of data.classes.")
    if len(classes) < 2:
        raise FinetuneError(f"Label file {table.file} has {len(classes)} class ({', '.join(classes) or 'none'}); "
                            "at least 2 are needed.")
    return classes


def problems(config: Config) -> list[Problem]:
    """The label file's problems for ``validate`` (see :func:`read_checked`). A file is read top to bottom, so the
    first kind of problem found is the one reported: all of that kind, with their lines."""
    try:
        read_checked(config)
    except FinetuneError as exc:
        return [Problem("data.labels", str(exc))]
    return []


def read_checked(config: Config) -> tuple[LabelTable, list[str]]:
    """``data.labels`` read and checked, with its classes: the file, its columns, rows, splits and labels, and the
    images its training rows name. Raises FinetuneError naming the file and lines."""
    table = read_label_file(config)
    classes = label_classes(config, table)
    _check_images(config, table, training_rows(table))
    return table, classes


def training_rows(table: LabelTable) -> list[Row]:
    """The rows training reads: those of split train and val, or every row without a split column."""
    return table.rows_of("train") + table.rows_of("val") if table.split_column else list(table.rows)


def training_samples(config: Config, table: LabelTable, classes: list[str]):
    """(path, target) samples of the training rows: ``(train, val)`` by the split column, or ``(all, None)``
    without one (for the data.val_fraction split)."""
    if not table.split_column:
        return samples(config, classes, table.rows), None
    return samples(config, classes, table.rows_of("train")), samples(config, classes, table.rows_of("val"))


def split_samples(config: Config, classes: list[str], split: str) -> list[tuple]:
    """(path, target) samples of ``split`` in ``data.labels`` (every row when it has no split column) for
    evaluation, labelled by ``classes`` (a trained model's)."""
    table = read_label_file(config)
    rows = table.rows_of(split) if table.split_column else table.rows
    if not rows:
        raise FinetuneError(f"Label file {table.file} has no rows of split {split}; give rows with {split} in its "
                            f"{config.data.columns.split or 'split'!r} column, or choose another --split.")
    known = set(classes)
    unknown = [(row.line, f"label {label!r} is not one of the model's classes ({', '.join(classes)})")
               for row in rows for label in row.labels if label not in known]
    _raise(table.file, unknown, ("unknown label", "unknown labels"), "Evaluate on labels the model was trained on.")
    _check_images(config, table, rows)
    return samples(config, classes, rows)


def strata(targets: list) -> list[int]:
    """What the val_fraction split stratifies by: the class, or for multi-hot targets each image's rarest label
    (-1 for an image without labels), so that rare labels reach both splits."""
    if not targets or not isinstance(targets[0], torch.Tensor):
        return list(targets)
    hot = torch.stack(targets) > 0.5
    counts = hot.sum(0)
    rarity = torch.where(hot, counts, torch.iinfo(counts.dtype).max)  # only the labels an image has compete
    return [int(i) if row.any() else -1 for i, row in zip(rarity.argmin(1), hot)]


def samples(config: Config, classes: list[str], rows: list[Row]) -> list[tuple]:
    """(path, target) of ``rows``: a class index sorted by (class name, path) as ImageFolder sorts a tree, or for
    ``model.task: multilabel`` a multi-hot row sorted by path."""
    index = {name: i for i, name in enumerate(classes)}
    if config.model.task == "multilabel":
        return sorted((row.path, _multi_hot(row.labels, index)) for row in rows)
    return [(row.path, index[row.labels[0]]) for row in sorted(rows, key=lambda r: (r.labels[0], r.path))]


def _multi_hot(labels: tuple[str, ...], index: dict[str, int]) -> torch.Tensor:
    target = torch.zeros(len(index))
    target[[index[label] for label in labels]] = 1.0
    return target


def _check_images(config: Config, table: LabelTable, rows: list[Row]) -> None:
    missing = [(row.line, _shown(row.path, config)) for row in rows if not os.path.isfile(row.path)]
    where = f"under data.root {config.data.root}"
    _raise(table.file, missing, (f"row whose image is missing {where}", f"rows whose images are missing {where}"),
           "Fix the paths (relative to data.root) or remove the rows.")


def notes(config: Config, table: LabelTable) -> list[str]:
    """What a run notes about the file: a multi-label file with one label on every row."""
    if config.model.task == "multilabel" and all(len(row.labels) == 1 for row in table.rows):
        return [f"every row of {table.file} has exactly one label: fine for model.task multilabel, but if each image "
                "has one class, model.task: multiclass (softmax over the classes) suits it better"]
    return []
