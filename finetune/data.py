"""ImageFolder trees: class discovery, train/val split, transforms and loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from finetune.config import Config, config_error


def train_folder(root: Path) -> Path:
    """``root/train`` for a split tree, else ``root`` itself (split by data.val_fraction)."""
    return root / "train" if (root / "train").is_dir() else root


def class_names(config: Config) -> list[str]:
    """Sorted class folder names under the training tree of ``data.root``, as ImageFolder sees them."""
    root = Path(config.data.root)
    if not root.is_dir():
        raise config_error(config, [("data.root", f"folder not found: {root}")])
    folder = train_folder(root)
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise config_error(config, [("data.root", f"{folder} has no class folders; expected "
                                     f"{folder}/<class>/<image> (torchvision ImageFolder layout)")])
    return names


def class_names_or_none(config: Config) -> Optional[list[str]]:
    return class_names(config) if config.data.root else None
