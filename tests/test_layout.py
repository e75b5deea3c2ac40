"""The package's plan holds: imports go down the layers (errors, utils < config < data < models < training <
analysis < deploy < cli) and no modules import each other in a circle (scripts/code_shape.py measures both)."""

from __future__ import annotations

import importlib.util

from helpers import REPO

spec = importlib.util.spec_from_file_location("code_shape", REPO / "scripts" / "code_shape.py")
shape = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shape)


def test_imports_go_down_the_layers_and_never_round_a_circle():
    edges = shape.imports(shape.modules())
    assert edges["finetune.training.run"] >= {"finetune.training.setup", "finetune.config.schema"}  # it reads them
    assert shape.upward(edges) == []
    assert shape.cycles(edges) == []


def test_the_checks_see_an_upward_import_and_a_circle():
    edges = {"finetune.models.build": {"finetune.training.optim"}, "finetune.training.optim": {"finetune.models.build"},
             "finetune.config.schema": set()}
    assert shape.upward(edges) == [("finetune.models.build", "finetune.training.optim")]
    assert shape.cycles(edges) == [["finetune.models.build", "finetune.training.optim"]]
