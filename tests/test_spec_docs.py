"""docs/spec.md is what the spec's models render, and the minimal spec it shows is the paper's recipe."""

from __future__ import annotations

from pathlib import Path

from alexnet_dist.cli.spec import DOCS_COMMAND, MINIMAL_SPEC, spec_markdown, spec_reference
from alexnet_dist.spec import JobSpec, parse_spec_text

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "spec.md"


def test_docs_spec_md_is_what_the_code_renders() -> None:
    rendered = spec_markdown()
    written = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    assert written == rendered, (
        f"docs/spec.md is out of date with alexnet_dist/spec/models.py; run `{DOCS_COMMAND}`"
    )


def test_the_docs_have_a_table_row_for_every_field() -> None:
    rows = {
        line.split("|")[1].strip().strip("`")
        for line in spec_markdown().splitlines()
        if line.startswith("| `")
    }
    assert rows == {f.path for s in spec_reference() for f in s.fields}


def test_the_minimal_spec_of_the_docs_is_the_papers_recipe() -> None:
    spec = parse_spec_text(MINIMAL_SPEC, source="docs/spec.md")
    assert (spec.model.preset, spec.model.num_classes, spec.train.epochs, spec.train.batch_size) == (
        "paper",
        1000,
        90,
        128,
    )
    assert (spec.optim.lr, spec.optim.momentum, spec.optim.weight_decay, spec.optim.max_decays) == (
        0.01,
        0.9,
        5e-4,
        3,
    )
    assert spec.scaling.devices == "gpu-pair" and spec.scaling.workers == 1
    required = {f.path for s in spec_reference() for f in s.fields if f.default == "required"}
    assert required == {"name", "data.train", "data.val", "scaling.workers", "scaling.devices"}
    assert set(JobSpec.model_json_schema()["required"]) == {"name", "data", "scaling"}
