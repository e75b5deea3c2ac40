"""Tests for the procedurally drawn demo data set (finetune.data.demo)."""

from pathlib import Path

import pytest
from PIL import Image

from finetune.data.demo import SHAPES, class_sizes, make_shapes
from finetune.errors import FinetuneError

SMALL = dict(classes=3, train_per_class=4, val_per_class=2, image_size=24)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_images(tmp_path):
    out = tmp_path / "nested" / "shapes"  # parents are created
    summary = make_shapes(out, **SMALL)
    names = list(SHAPES[:3])
    assert summary == {"root": str(out), "classes": names, "train": 12, "val": 6, "image_size": 24,
                       "train_sizes": [4, 4, 4], "val_sizes": [2, 2, 2]}
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    for split, per_class in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(names)
        for name in names:
            files = sorted((out / split / name).iterdir())
            assert [p.name for p in files] == sorted(f"{i}.png" for i in range(per_class))
            for p in files:
                with Image.open(p) as img:
                    assert img.mode == "RGB" and img.size == (24, 24)
    # no temporary folder is left next to the output
    assert [p.name for p in out.parent.iterdir()] == ["shapes"]


def test_deterministic_and_seed_dependent(tmp_path):
    a = _files(Path(make_shapes(tmp_path / "a", seed=7, **SMALL)["root"]))
    b = _files(Path(make_shapes(tmp_path / "b", seed=7, **SMALL)["root"]))
    c = _files(Path(make_shapes(tmp_path / "c", seed=8, **SMALL)["root"]))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_val_does_not_repeat_train(tmp_path):
    out = tmp_path / "out"
    make_shapes(out, **SMALL)
    train = {p.read_bytes() for p in (out / "train").rglob("*.png")}
    val = {p.read_bytes() for p in (out / "val").rglob("*.png")}
    assert len(train) == 12 and len(val) == 6
    assert not train & val


@pytest.mark.parametrize("kwargs, option", [
    (dict(classes=1), "--classes"),
    (dict(classes=len(SHAPES) + 1), "--classes"),
    (dict(image_size=15), "--image-size"),
    (dict(train_per_class=0), "--train-per-class"),
    (dict(val_per_class=0), "--val-per-class"),
    (dict(classes="4"), "--classes"),
])
def test_bad_arguments(tmp_path, kwargs, option):
    with pytest.raises(FinetuneError) as exc:
        make_shapes(tmp_path / "out", **kwargs)
    assert option in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_classes_message_names_range(tmp_path):
    with pytest.raises(FinetuneError, match=f"between 2 and {len(SHAPES)}"):
        make_shapes(tmp_path / "out", classes=99)


def test_existing_non_empty_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="not empty") as exc:
        make_shapes(out, **SMALL)
    assert str(out) in str(exc.value)
    assert _files(out) == {"keep.txt": b"mine"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder\n")
    with pytest.raises(FinetuneError, match=r"Cannot write the data set .*file.txt/shapes \(.*file.txt\): File exists\. "
                                            r"Choose another folder"):
        make_shapes(tmp_path / "file.txt" / "shapes", classes=2, train_per_class=1, val_per_class=1, image_size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_existing_empty_folder_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    make_shapes(out, **SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]


def test_imagefolder_loads_it(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    out = tmp_path / "out"
    make_shapes(out, classes=4, train_per_class=2, val_per_class=1, image_size=16)
    ds = datasets.ImageFolder(out / "train")
    assert ds.classes == sorted(SHAPES[:4])
    assert len(ds) == 8
    img, label = ds[0]
    assert img.size == (16, 16) and ds.classes[label] == "circle"


def test_make_dataset_cli(tmp_path):
    from helpers import run_cli

    made = run_cli("make-dataset", "shapes", str(tmp_path / "out"), "--classes", "3", "--train-per-class", "2",
                   "--val-per-class", "1", "--image-size", "16")
    assert made.returncode == 0, made.stderr
    assert "Wrote 6 train and 3 val images of 3 classes" in made.stdout
    unknown = run_cli("make-dataset", "faces", str(tmp_path / "other"))
    assert unknown.returncode == 2 and "'shapes'" in unknown.stderr and "Traceback" not in unknown.stderr
    assert not (tmp_path / "other").exists()


def test_imbalanced_sizes_fall_geometrically_from_first_to_last():
    assert class_sizes(1000, 4, 10) == [1000, 464, 215, 100]
    assert class_sizes(7, 3, 1) == [7, 7, 7]


def test_imbalanced_set_holds_the_first_images_of_the_balanced_one(tmp_path):
    balanced = _files(Path(make_shapes(tmp_path / "b", **SMALL)["root"]))
    summary = make_shapes(tmp_path / "i", imbalance=2, **SMALL)
    assert summary["train_sizes"] == [4, 3, 2] and summary["val_sizes"] == [2, 1, 1]
    assert summary["train"] == 9 and summary["val"] == 4
    imbalanced = _files(tmp_path / "i")
    assert len(imbalanced) == 13 and all(balanced[k] == v for k, v in imbalanced.items())
    for split, sizes in (("train", summary["train_sizes"]), ("val", summary["val_sizes"])):
        assert [len(list((tmp_path / "i" / split / name).iterdir())) for name in SHAPES[:3]] == sizes


@pytest.mark.parametrize("imbalance, message", [
    (0.5, "--imbalance must be a number >= 1"), (float("inf"), "--imbalance must be a number >= 1"),
    (True, "--imbalance must be a number >= 1"), (5, "leaves the last class no val images")])
def test_bad_imbalance(tmp_path, imbalance, message):
    with pytest.raises(FinetuneError, match=message):
        make_shapes(tmp_path / "out", imbalance=imbalance, **SMALL)
    assert not (tmp_path / "out").exists()


def test_make_dataset_cli_imbalanced(tmp_path):
    from helpers import run_cli

    made = run_cli("make-dataset", "shapes", str(tmp_path / "out"), "--classes", "3", "--train-per-class", "9",
                   "--val-per-class", "9", "--image-size", "16", "--imbalance", "9")
    assert made.returncode == 0, made.stderr
    assert "Wrote 13 train and 13 val images of 3 classes (circle 9/9, square 3/3, triangle 1/1 train/val images)" \
        in made.stdout

