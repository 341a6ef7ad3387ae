"""A new method that is "scores + schedule" is a few lines in its own file: this test writes one (gradual pruning
by random scores on the cubic schedule, then the run's fine-tuning), registers it without touching any other
file, and runs it end to end (issue 27's criterion: no more than about 15 lines)."""
from __future__ import annotations

import importlib.util

import numpy as np

from fairprune_jax.data import Dataset, load_dataset
from fairprune_jax.methods.base import METHODS
from fairprune_jax.running.runner import RunConfig, prepare, run_method

NEW_METHOD = '''
import jax
from fairprune_jax.sparsity import scores
from fairprune_jax.techniques.gradual import DistillOptions, cubic_points, score_hook
from fairprune_jax.sparsity.masks import ones_like_template
from fairprune_jax.methods.base import register


@register("gradual_random_demo", "random scores on the cubic schedule, then fine-tuning", DistillOptions)
def gradual_random(ctx, dense, opts):
    key = jax.random.key(ctx.stream_seed("random_scores"))
    total = ctx.settings.ft_epochs * ctx.steps_per_epoch
    points = cubic_points(ctx.settings.sparsity, max(int(0.75 * total), 1), 10)
    hook = score_hook(ctx, points, ctx.template, lambda params, template: scores.random(key, params, template))
    state, hist = ctx.finetune_masks(dense, ones_like_template(dense.params, ctx.template), hook=hook)
    return hook(state, max(points)), {"history": hist}
'''


def test_a_scores_and_schedule_method_in_a_few_lines(tmp_path):
    body = [ln for ln in NEW_METHOD.strip().splitlines() if ln.strip()]
    assert len(body) <= 15, len(body)
    path = tmp_path / "gradual_random_demo.py"
    path.write_text(NEW_METHOD)
    spec = importlib.util.spec_from_file_location("gradual_random_demo", path)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        full = load_dataset("digits")
        idx = np.random.default_rng(0).permutation(len(full.train))[:400]
        ds = Dataset(full.name, full.train.take(idx), full.test, full.group_names, full.group_attrs,
                     full.class_names)
        prep = prepare(RunConfig(method="nft", dataset="digits", sparsity=0.8, epochs=2, finetune_epochs=2,
                                 progress=False, seed=0), dataset=ds)
        res = run_method(prep, method="gradual_random_demo")
        assert abs(res["sparsity"]["achieved"] - 0.8) < 1e-3                   # exact sparsity at the end
        assert 0.0 < res["pruned"]["test"]["accuracy"] <= 1.0
        assert "certificate" in res["pruned"]["test"]                          # the same report as any method
    finally:
        METHODS.pop("gradual_random_demo", None)                               # leave the registry as it was
