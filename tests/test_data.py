"""ImageFolder trees: layouts, the stratified split, image modes, loader order, and data errors."""

from __future__ import annotations

import pytest
import torch
from helpers import make_colour_folder, run_cli, tiny_config
from PIL import Image

from finetune.config.loading import load_config
from finetune.data.folders import load_datasets, stratified_split
from finetune.data.loaders import default_workers, make_loader, steps_per_epoch
from finetune.errors import FinetuneError
from finetune.models.build import resolve_num_classes


def config_for(tmp_path, root, **data):
    return load_config(tiny_config(tmp_path / "cfg", root, data=data))


def test_single_tree_is_split_stratified_and_seeded(tmp_path):
    make_colour_folder(tmp_path / "data", 10)
    config = config_for(tmp_path, tmp_path / "data", val_fraction=0.3)
    data = load_datasets(config)
    assert data.layout == "split by data.val_fraction"
    assert (len(data.train), len(data.val)) == (21, 9)
    val_targets = [data.val.dataset.targets[i] for i in data.val.indices]
    assert sorted(val_targets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 3 of each class
    assert not set(data.train.indices) & set(data.val.indices)
    assert stratified_split(list(range(3)) * 10, 0.3, seed=0) == stratified_split(list(range(3)) * 10, 0.3, seed=0)
    assert stratified_split(list(range(3)) * 10, 0.3, seed=0) != stratified_split(list(range(3)) * 10, 0.3, seed=1)


def test_train_val_folders_share_class_indices_even_when_val_lacks_a_class(tmp_path):
    make_colour_folder(tmp_path / "data" / "train", 3)
    make_colour_folder(tmp_path / "data" / "val", 2)
    for image in (tmp_path / "data" / "val" / "blue").iterdir():
        image.unlink()
    (tmp_path / "data" / "val" / "blue").rmdir()
    data = load_datasets(config_for(tmp_path, tmp_path / "data"))
    assert data.classes == ["blue", "green", "red"]
    assert sorted(set(data.val.targets)) == [1, 2]  # green and red keep the train indices


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    make_colour_folder(tmp_path / "data", 3)
    Image.new("L", (40, 30), 128).save(tmp_path / "data" / "red" / "gray.png")
    Image.new("RGBA", (30, 40), (200, 0, 0, 100)).save(tmp_path / "data" / "red" / "alpha.png")
    config = config_for(tmp_path, tmp_path / "data", val_fraction=0.2)
    data = load_datasets(config)
    shapes = {tuple(data.train.dataset[i][0].shape) for i in range(len(data.train.dataset))}
    assert shapes == {(3, 32, 32)}


def test_loader_order_depends_on_seed_and_epoch_only(tmp_path):
    dataset = torch.utils.data.TensorDataset(torch.arange(20))
    order = lambda **kw: [int(x) for (batch,) in make_loader(dataset, 4, shuffle=True, **kw) for x in batch]
    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=2, skip_batches=2) == order(seed=1, epoch=2)[8:]
    assert sorted(order(seed=3, epoch=0)) == list(range(20))


class Reads(torch.utils.data.Dataset):
    """Items that take ``seconds`` to read and draw from torch's generator, as a random transform does."""

    def __init__(self, seconds: float, size: int = 100):
        self.seconds, self.size, self.read = seconds, size, []

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        import time

        self.read.append(index)
        time.sleep(self.seconds)
        return torch.rand(1)


def test_cheap_images_are_read_in_the_main_thread_and_slow_ones_by_threads(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    state = torch.random.get_rng_state()
    assert default_workers(Reads(0)) == 0
    slow = Reads(0.002)
    assert default_workers(slow) == 2 and len(slow.read) == 2  # one untimed read, one slow one: no more
    assert default_workers() == 2
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe's random draws leave the run's alone


def test_a_lone_last_sample_is_dropped_so_batchnorm_can_train():
    dataset = torch.utils.data.TensorDataset(torch.arange(9))
    assert [len(b[0]) for b in make_loader(dataset, 4, shuffle=True)] == [4, 4]
    assert steps_per_epoch(dataset, 4) == 2
    assert steps_per_epoch(torch.utils.data.TensorDataset(torch.arange(10)), 4) == 3


@pytest.mark.parametrize("setup, fragment", [
    (lambda root: None, "folder not found"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (make_colour_folder(root / "train", 2), make_colour_folder(root / "val", 1),
                   (root / "val" / "purple").mkdir()), "purple"),
    (lambda root: (make_colour_folder(root, 2), (root / "empty").mkdir()), "empty"),
], ids=["missing-root", "no-classes", "val-class-not-in-train", "empty-class"])
def test_bad_data_trees_are_clear_errors(tmp_path, setup, fragment):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(FinetuneError) as error:
        load_datasets(config_for(tmp_path, root))
    assert "data.root" in str(error.value) and fragment in str(error.value)


def test_num_classes_must_match_the_data(tmp_path, colour_data):
    config = load_config(tiny_config(tmp_path, colour_data, model={"weights": "none", "num_classes": 5}))
    with pytest.raises(FinetuneError, match="model.num_classes.*is 5 but the data .* has 3 classes"):
        resolve_num_classes(config, load_datasets(config).classes)


def test_train_cli_reports_a_data_error_without_traceback(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "nowhere")
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 2
    assert "data.root" in result.stderr and "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_demo_data_is_generated_on_first_use(tmp_path):
    config = load_config(tiny_config(tmp_path, tmp_path / "shapes", data={"demo": "shapes"}))
    from finetune.data.folders import ensure_demo_data

    info = ensure_demo_data(config)
    assert info["classes"] == ["circle", "square", "triangle", "cross"]
    assert load_datasets(config).classes == sorted(info["classes"])
    assert ensure_demo_data(config) is None  # already there: left alone
