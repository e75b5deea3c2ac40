"""The supported models as data, for ``finetune models``: torchvision's metadata (kept in ``arch``), no torch.
"""

from __future__ import annotations

import difflib
from typing import Optional

from finetune.config.schema import DEFAULT_ARCH
from finetune.errors import FinetuneError
from finetune.models.arch import ARCH_NAMES, ARCHS


def model_names(only: Optional[str] = None) -> list[str]:
    """Every supported model, or those of the comma-separated ``only`` (``--only``), in catalogue order.

    Raises FinetuneError for a name finetune does not know, with the closest ones.
    """
    if not only:
        return list(ARCH_NAMES)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    for name in wanted:
        if name not in ARCHS:
            close = difflib.get_close_matches(name, ARCH_NAMES, n=3, cutoff=0.4)
            hint = f"closest: {', '.join(close)}" if close else f"supported: {', '.join(ARCH_NAMES)}"
            raise FinetuneError(f"Unknown model {name!r} in --only; {hint}.")
    return [name for name in ARCH_NAMES if name in wanted]


def model_rows(names: list[str]) -> list[dict]:
    """One row per model: family, parameters and GFLOPs (ImageNet head, default weights), ImageNet top-1, the
    default image size and preprocessing, its weights names."""
    rows = []
    for name in names:
        arch = ARCHS[name]
        own = arch.weights[0]
        rows.append({"model": name, "title": arch.title, "family": arch.family.name, "params_m": arch.params / 1e6,
                     "gflops": own.gflops, "acc1": own.acc1, "image_size": own.crop, "resize": own.resize,
                     "interpolation": own.interpolation, "norm": arch.family.norm,
                     "weights": list(arch.weight_names), "default": name == DEFAULT_ARCH})
    return rows
