"""The ImageNet recipe (jobs/imagenet-paper.toml) is the paper's, and the sizing page in cluster/README.md
quotes the model's real parameter and gradient sizes.
"""

from __future__ import annotations

import re

from clusterfiles import README, RECIPE

PAPER_PARAMS = 60_965_224


def test_imagenet_recipe_is_the_papers() -> None:
    from alexnet_dist.spec import load_spec

    spec = load_spec(RECIPE)
    assert (spec.train.epochs, spec.train.batch_size, spec.train.ten_crop_eval) == (90, 128, True)
    o = spec.optim
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.lr_decay, o.max_decays) == (
        0.01,
        0.9,
        0.0005,
        "plateau",
        0.1,
        3,
    )
    assert (spec.model.preset, spec.model.num_classes, spec.scaling.devices) == ("paper", 1000, "gpu-pair")
    assert spec.scaling.gpus_per_worker == 2 and spec.per_worker_batch == 64
    assert spec.data.train.startswith("s3://") and spec.checkpoint.storage.startswith("s3://")


def test_sizing_page_figures_match_the_model() -> None:
    from alexnet_dist.model.network import build_model, count_parameters

    model = build_model("paper", num_classes=1000)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert count_parameters(model) == PAPER_PARAMS and grad_bytes == 243_860_896
    text = README.read_text()
    assert "60,965,224" in text and "243,860,896" in text
    # The ring all-reduce table: each worker sends 2(N-1)/N of the gradient per step.
    for n in (2, 4, 8, 16):
        mb = 2 * (n - 1) / n * grad_bytes / 1e6
        assert re.search(rf"\|\s*{n}\s*\|\s*{mb:.1f} MB", text), f"row N={n} ({mb:.1f} MB) missing"
    assert 'train.grad_compression = "bf16"' in text
