"""The documentation: the config reference is the schema's, every relative link leads somewhere, the README is short."""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from finetune.config.schema import Config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Pages that parallel changes add (issue #19 and the issues after it): the README links them already. Links to them
# are allowed while they are missing; once a page exists its links and headings are checked like any other's.
TOPICS = {REPO / "docs" / name  # linked from the README
          for name in ("deployment.md", "tracking.md", "data.md", "models.md", "recipes.md")}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _generator():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schema_keys(section: type[BaseModel], prefix: str) -> list[str]:
    """Every dotted key of ``section``, nested sections included (``freeze.stages[].epoch``)."""
    keys = []
    for name, field in section.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        union = typing.get_origin(field.annotation) is typing.Union
        for option in typing.get_args(field.annotation) if union else (field.annotation,):
            is_list = typing.get_origin(option) is list
            inner = typing.get_args(option)[0] if is_list else option
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                keys += _schema_keys(inner, key + ("[]" if is_list else ""))
        keys.append(key)
    return keys


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where ``](...)`` and ``#`` lines are not Markdown."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M),
                              flags=re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_config_reference_is_what_the_generator_writes_from_the_schema():
    expected = _generator().render()
    assert (REPO / "docs" / "config.md").read_text() == expected, (
        "docs/config.md is stale: run `python scripts/config_reference.py` and commit the result")


def test_config_reference_has_a_described_row_for_every_key_nested_ones_too():
    rows = {}
    for line in _generator().render().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells
    keys = _schema_keys(Config, "")
    sections = set(Config.model_fields)
    assert set(rows) == set(keys) - sections
    assert {"freeze.stages[].epoch", "optim.param_groups[].lr", "train.early_stopping.patience"} <= set(rows)
    assert all(len(cells) == 5 and cells[4] for cells in rows.values()), "every key needs description=... in its Field"
    assert rows["data.image_size"][1:4] == ["integer or null", "`null`", "≥ 32, ≤ 1024"]
    assert rows["train.precision"][3] == "`auto`, `fp32`, `bf16`"
    assert rows["freeze.stages[].epoch"][2] == "required"


def test_every_relative_link_points_to_a_file_and_heading_that_exist():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
    assert {REPO / "docs" / name for name in ("config.md", "commands.md", "performance.md", "design.md")} <= set(PAGES)


def test_readme_is_short_and_gives_the_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert len(readme.splitlines()) <= 300
    assert ci_command == "bash scripts/test.sh" and f"\n{ci_command}" in readme
    assert all(page.exists() and f"docs/{page.name}" in readme for page in TOPICS)
