"""`finetune calibrate`: fit a checkpoint's temperature on its run's validation split and store it in the checkpoint.

The math and the storing are ``training.calibration``'s (``train.calibrate`` runs the same at the end of training);
this adds what a command on any checkpoint needs: a clear error for a file that is not one, and no refit of a
calibrated checkpoint without ``--overwrite``.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data.folders import load_datasets
from finetune.deploy.artifacts import load_trained
from finetune.errors import FinetuneError
from finetune.training.calibration import calibrate_checkpoint


def calibrate(checkpoint: Path, overwrite: bool = False) -> dict:
    """Fit, store and report the temperature of ``checkpoint`` (see ``training.calibration.calibrate_checkpoint``).

    Raises FinetuneError (exit code 2, the checkpoint untouched) for a file that is not a usable checkpoint, one
    already calibrated without ``overwrite``, or a validation split that cannot be read or has under 2 images.
    """
    checkpoint = Path(checkpoint)
    trained = load_trained(checkpoint)
    if trained.calibration is not None and not overwrite:
        raise FinetuneError(f"{checkpoint} is already calibrated (temperature {trained.temperature:.4g}); pass "
                            "--overwrite to fit it again.")
    val = load_datasets(trained.config).val
    return calibrate_checkpoint(checkpoint, val, trained.config.train.batch_size, trained.model)
