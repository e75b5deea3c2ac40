"""Label files (data.labels): columns, classes, splits, paths kept inside data.root, every bad input named by file
and line, and a label file that lists a folder tree giving that tree's very run, resumed bit for bit."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import pytest
from helpers import assert_same_weights, interrupt, make_colour_folder, run_cli, tiny_config, weights

from finetune.config import Config
from finetune.config.loading import load_config
from finetune.data.folders import image_samples, load_datasets
from finetune.errors import FinetuneError


def write_rows(path: Path, rows: list[tuple], header=("path", "label", "split"), delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerows([header, *rows])
    return path


def tree_rows(root: Path) -> list[tuple[str, str, str]]:
    """A row (path relative to root, class, split) for every image of root/{train,val}/<class>/, in reverse."""
    return sorted(((str(p.relative_to(root)), p.parent.name, p.parent.parent.name)
                   for p in root.rglob("*.png")), reverse=True)


def label_config(tmp_path: Path, labels: Path, root: Optional[Path] = None, **sections) -> Path:
    data = {"labels": str(labels), "root": str(root) if root else None, **sections.pop("data", {})}
    return tiny_config(tmp_path / "cfg", root or labels.parent, data=data, **sections)


@pytest.fixture
def colours(tmp_path) -> Path:
    """A flat folder of three colour classes (4 images each), to list in label files."""
    return make_colour_folder(tmp_path / "images", 4)


def test_columns_mapping_tsv_and_class_order(tmp_path, colours):
    rows = [(str(p.relative_to(colours)), p.parent.name) for p in sorted(colours.rglob("*.png"))]
    labels = write_rows(tmp_path / "labels.tsv", rows, header=("file", "tag"), delimiter="\t")
    config = load_config(label_config(tmp_path, labels, colours, data={
        "columns": {"path": "file", "label": "tag"}, "classes": ["red", "green", "blue"], "val_fraction": 0.25}))
    data = load_datasets(config)
    assert data.classes == ["red", "green", "blue"] and data.layout == "label file labels.tsv, split by data.val_fraction"
    samples = image_samples(data.train) + image_samples(data.val)
    assert sorted(samples) == sorted((str(colours / path), ["red", "green", "blue"].index(name)) for path, name in rows)
    assert sorted(data.classes[t] for _, t in image_samples(data.val)) == ["blue", "green", "red"]  # stratified
    saved = Config.model_validate(config.model_dump(mode="json"))  # as a checkpoint or config.yaml holds it
    assert image_samples(load_datasets(saved).val) == image_samples(data.val)
    config.data.columns.split = "fold"  # a split column the config names must be there
    with pytest.raises(FinetuneError, match=r"lacks the column\(s\) split \('fold'\)"):
        load_datasets(config)


def test_multilabel_rows_split_by_the_delimiter_and_an_empty_label_is_a_negative(tmp_path, colours):
    names = [str(p.relative_to(colours)) for p in sorted(colours.rglob("*.png"))]
    rows = [(name, "red|blue" if i % 3 == 0 else "" if i % 3 == 1 else "green", "train" if i % 4 else "val")
            for i, name in enumerate(names)]
    labels = write_rows(tmp_path / "labels.csv", rows)
    data = load_datasets(load_config(label_config(tmp_path, labels, colours, data={"label_delim": "|"},
                                                  model={"task": "multilabel"})))
    assert data.classes == ["blue", "green", "red"] and not data.notes
    targets = [target.tolist() for _, target in image_samples(data.train)]
    assert sorted(targets) == sorted([[1.0, 0.0, 1.0]] * 3 + [[0.0, 0.0, 0.0]] * 3 + [[0.0, 1.0, 0.0]] * 3)


def test_multilabel_with_one_label_per_row_is_allowed_with_a_note(tmp_path, colours):
    labels = write_rows(tmp_path / "labels.csv", [(str(p.relative_to(colours)), p.parent.name)
                                                  for p in colours.rglob("*.png")], header=("path", "label"))
    data = load_datasets(load_config(label_config(tmp_path, labels, colours, model={"task": "multilabel"})))
    assert len(data.notes) == 1 and "exactly one label" in data.notes[0] and "multiclass" in data.notes[0]


def _bad(tmp_path: Path, colours: Path, case: str) -> tuple[Path, dict, list[str]]:
    """A bad label file for ``case``, config sections, and what the error must say."""
    good = [(str(p.relative_to(colours)), p.parent.name, "train") for p in sorted(colours.rglob("*.png"))]
    labels = tmp_path / "labels.csv"
    if case == "missing":
        return tmp_path / "nowhere.csv", {}, ["Label file not found", "nowhere.csv"]
    if case == "empty":
        labels.write_text("")
        return labels, {}, ["is empty"]
    if case == "header only":
        labels.write_text("path,label\n")
        return labels, {}, ["has no rows"]
    if case == "not utf-8":
        labels.write_bytes(b"path,label\nred/0.png,red\nred/1.png,caf\xe9\n")
        return labels, {}, ["not UTF-8", "line 3", "0xe9"]
    if case == "no label column":
        write_rows(labels, [row[:2] for row in good], header=("path", "class"))
        return labels, {}, ["lacks the column(s) label ('label')", "'path', 'class'", "data.columns"]
    if case == "missing images":
        write_rows(labels, good + [(f"red/gone{i}.png", "red", "train") for i in range(7)])
        return labels, {}, ["7 rows whose images are missing", "line 14: red/gone0.png", "line 18: red/gone4.png",
                            "... and 2 more"]
    if case == "unknown split":
        write_rows(labels, good[:-1] + [(good[-1][0], good[-1][1], "valid")])
        return labels, {}, ["line 13: has split 'valid'; use train, val or test"]
    if case == "label only in val":
        write_rows(labels, good[1:] + [(good[0][0], "purple", "val")])
        return labels, {}, ["line 13: label 'purple' appears only in val"]
    if case == "same path, other label":
        write_rows(labels, good + [(good[0][0], "green", "train")])
        return labels, {}, ["line 14: blue/0.png again, with label 'green' in split train; line 2 gave it label "
                            "'blue'"]
    if case == "path escapes":
        outside = tmp_path / "secret.png"
        outside.write_bytes((colours / "red" / "0.png").read_bytes())
        write_rows(labels, good + [("../secret.png", "red", "train"), (str(outside), "red", "train")])
        return labels, {}, ["2 problems", "line 14: names ../secret.png, outside data.root", "line 15: names "
                            f"{outside}, outside data.root"]
    assert case == "not in data.classes"
    write_rows(labels, good)
    return labels, {"classes": ["blue", "green"]}, ["4 unknown labels", "label 'red' is not in data.classes"]


BAD = ["missing", "empty", "header only", "not utf-8", "no label column", "missing images", "unknown split",
       "label only in val", "same path, other label", "path escapes", "not in data.classes"]


@pytest.mark.parametrize("case", BAD)
def test_bad_label_files_exit_2_naming_file_and_line_and_write_nothing(tmp_path, colours, case):
    labels, data, expected = _bad(tmp_path, colours, case)
    config = label_config(tmp_path, labels, colours, data=data)
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    for text in [str(labels), *expected]:
        assert " ".join(text.split()) in message, (text, result.stderr)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cfg" / "run").exists()


def test_an_absolute_path_inside_data_root_is_fine(tmp_path, colours):
    labels = write_rows(tmp_path / "labels.csv", [(str(p), p.parent.name) for p in colours.rglob("*.png")],
                        header=("path", "label"))
    data = load_datasets(load_config(label_config(tmp_path, labels, colours)))
    assert len(data.train) + len(data.val) == 12


# Classes balanced by the loss and the sampler: resume has momentum and the sampling to restore.
SECTIONS = dict(data={"sampler": "balanced"}, train={"epochs": 2, "batch_size": 6, "class_weights": "balanced"})


@pytest.fixture(scope="module")
def folder_run(module_tmp, colour_data) -> Path:
    """Two epochs on the colour tree, read as class folders."""
    from finetune.training.reporter import Reporter
    from finetune.training.run import train

    folder = module_tmp("folder_run")
    train(load_config(tiny_config(folder, colour_data, **SECTIONS)), Reporter())
    return folder / "run"


def test_a_label_file_of_a_tree_gives_its_run_and_resumes_bit_exact(tmp_path, colour_data, folder_run):
    from finetune.training.reporter import Reporter
    from finetune.training.run import train

    labels = write_rows(tmp_path / "labels.csv", tree_rows(colour_data))  # lines in another order than the tree's
    # decode threads too: the batches are the same whatever their number
    sections = {**SECTIONS, "data": {**SECTIONS["data"], "labels": str(labels), "root": str(colour_data), "workers": 2}}
    config = load_config(tiny_config(tmp_path, colour_data, **sections))
    interrupt(train, config, epoch=1, step=2)  # inside the second epoch
    train(config, Reporter(), resume=tmp_path / "run")
    assert_same_weights(weights(tmp_path / "run"), weights(folder_run))
    drop = ("seconds", "images_per_s")
    rows = [[{k: v for k, v in json.loads(line).items() if k not in drop}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (tmp_path / "run", folder_run)]
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_evaluate_reads_a_label_file_as_the_folder_it_lists(tmp_path, colour_data, folder_run):
    (tmp_path / "data").symlink_to(colour_data)  # the label file's folder is its data.root
    labels = write_rows(tmp_path / "labels.csv", [(f"data/{path}", *rest) for path, *rest in tree_rows(colour_data)])
    reports = [run_cli("evaluate", str(folder_run / "best.pt"), *extra, "--json", "--output-dir", str(tmp_path / name))
               for name, extra in (("tree", []), ("file", ["--data", str(labels)]))]
    assert all(r.returncode == 0 for r in reports), reports[1].stderr
    tree, file = (json.loads(r.stdout) for r in reports)
    assert (tree["data"], file["data"]) == (str(colour_data), str(labels))
    assert {k: v for k, v in tree.items() if k not in ("data", "confusion_png")} == \
        {k: v for k, v in file.items() if k not in ("data", "confusion_png")}
    test = run_cli("evaluate", str(folder_run / "best.pt"), "--data", str(labels), "--split", "test")
    assert test.returncode == 2 and "has no rows of split test" in test.stderr
    test = run_cli("evaluate", str(folder_run / "best.pt"), "--split", "test")
    assert test.returncode == 2 and f"There is no test split: {colour_data / 'test'} is not a folder" in test.stderr
