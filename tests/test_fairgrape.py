"""FairGRAPE: per-group importance, the share-keeping selection, the method end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairprune_jax.techniques import group_importance as gi
from fairprune_jax.data.base import Split, eval_batches
from fairprune_jax.sparsity.masks import named_leaves, prunable_template
from fairprune_jax.methods import METHODS, RunConfig
from fairprune_jax.models import build_model
from fairprune_jax.training.train import cross_entropy


def _toy(num_groups=4, n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    g = rng.integers(0, num_groups, n).astype(np.int32)
    g[g == num_groups - 1] = 0          # the last group has no rows: importance 0
    fm, params, ms = build_model("mlp", (6,), 3, seed=seed, hidden=(5,))
    return Split(x, y, g), fm, params, ms


def _direct_importance(fm, params, masks, ms, split, G, bs, kind):
    """Per group and batch, the gradient of that group's mean loss, by a Python loop (outside jit)."""
    eff = jax.tree.map(lambda m, p: p if m is None else p * m, masks, params, is_leaf=lambda v: v is None)
    out = {n: np.zeros((G,) + v.shape) for n, v in named_leaves(params) if v.ndim >= 2}
    for batch in eval_batches(split, bs):
        for grp in range(G):
            sel = (batch["g"] == grp) & (batch["w"] > 0)
            if not sel.any():
                continue

            def loss(p):
                q = jax.tree.map(lambda m, w: w if m is None else w * m, masks, p, is_leaf=lambda v: v is None)
                logits, _ = fm.apply(q, ms, batch["x"][sel], train=True)
                return jnp.mean(cross_entropy(logits, batch["y"][sel]))

            grads = dict(named_leaves(jax.grad(loss)(params)))
            for name in out:
                v = np.asarray(dict(named_leaves(eff))[name]) * np.asarray(grads[name])
                out[name][grp] += v ** 2 if kind == "squared" else np.abs(v)
    return out


@pytest.mark.parametrize("kind,chunk", [("squared", 2), ("abs", 64)])
def test_importance_equals_per_group_gradients(kind, chunk):
    G = 4
    split, fm, params, ms = _toy(G)
    template = prunable_template(params)
    rng = np.random.default_rng(1)
    masks = jax.tree.map(lambda t, p: None if t is None else jnp.asarray(rng.random(p.shape) > 0.3, p.dtype),
                         template, params, is_leaf=lambda v: v is None)
    step = gi.make_importance_step(fm, template, G, kind=kind, group_chunk=chunk)
    got = dict(named_leaves(gi.group_importance(step, params, masks, ms, template, split, G, batch_size=16)))
    want = _direct_importance(fm, params, masks, ms, split, G, 16, kind)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=2e-4, atol=1e-9)
        assert np.all(np.asarray(got[name])[G - 1] == 0)                      # a group without rows
        m = np.asarray(dict(named_leaves(masks))[name]) > 0
        assert np.all(np.asarray(got[name])[:, ~m] == 0)                      # pruned weights
    assert any(np.asarray(v)[:G - 1].sum() > 0 for v in got.values())


def _reference_greedy(imp, live, k, picks):
    """The rule in words: the group furthest below its target share takes its next ``picks`` most important
    live entries not yet kept (ties to the lower index); each kept entry adds all groups' importance."""
    G, n = imp.shape
    imp = np.where(live[None], imp, 0.0)
    target = imp.sum(1) / imp.sum()
    kept, sums, count = np.zeros(n, bool), np.zeros(G), 0
    while count < k:
        prop = sums / sums.sum() if sums.sum() > 0 else np.full(G, 1.0 / G)
        grp = int(np.argmin(np.where(target > 0, prop - target, np.inf)))
        cand = [i for i in sorted(range(n), key=lambda i: (-imp[grp, i], i)) if live[i] and not kept[i]]
        for i in cand[:min(picks, k - count)]:
            kept[i] = True
            sums += imp[:, i]
            count += 1
    return kept, target, sums / sums.sum()


@pytest.mark.parametrize("seed", range(4))
def test_selection_matches_the_rule_and_keeps_shares(seed):
    rng = np.random.default_rng(seed)
    G, n = int(rng.integers(2, 6)), int(rng.integers(30, 150))
    imp = (rng.gamma(0.5, size=(G, n)) * rng.uniform(0.1, 3.0, size=(G, 1))).astype(np.float32)
    live = rng.random(n) < 0.8
    k = int(rng.integers(live.sum() // 2, live.sum()))
    for picks in (1, 3):
        mask, target, kept_share = gi.proportional_select(imp, live, k, picks=picks)
        mask = np.asarray(mask) > 0
        ref, ref_target, ref_share = _reference_greedy(imp, live, k, picks)
        assert mask.sum() == k and not (mask & ~live).any()
        np.testing.assert_array_equal(mask, ref)
        np.testing.assert_allclose(target, ref_target, rtol=1e-5)
        np.testing.assert_allclose(kept_share, ref_share, rtol=1e-4)
        # the shares it reports are the shares of what it kept
        actual = np.where(mask[None], imp, 0).sum(1)
        np.testing.assert_allclose(kept_share, actual / actual.sum(), rtol=1e-4)


def test_selection_keeps_proportions_where_topk_does_not():
    """Group 1's importance is 10x smaller and sits on other weights: a top-k of the summed importance would
    keep almost none of group 1's, the selection keeps its share."""
    rng = np.random.default_rng(0)
    n, k = 2000, 1000
    imp = np.zeros((2, n), np.float32)
    imp[0, :1000] = rng.uniform(1, 2, 1000)
    imp[1, 1000:] = rng.uniform(0.1, 0.2, 1000)
    imp[:, :] += rng.uniform(0, 0.01, (2, n))
    target = imp.sum(1) / imp.sum()
    mask, t, kept = gi.proportional_select(imp, None, k, picks=2, max_decisions=64)
    mask = np.asarray(mask) > 0
    assert mask.sum() == k
    share = np.where(mask[None], imp, 0).sum(1)
    share = share / share.sum()
    np.testing.assert_allclose(t, target, rtol=1e-5)
    assert np.max(np.abs(share - target)) < 0.01, (share, target)
    top = np.argsort(-imp.sum(0), kind="stable")[:k]
    tk = imp[:, top].sum(1)
    assert abs(tk[1] / tk.sum() - target[1]) > 0.05     # the plain ranking loses group 1's share


def test_masks_exact_counts_and_no_revival():
    G = 3
    split, fm, params, ms = _toy(G, n=40)
    template = prunable_template(params)
    step = gi.make_importance_step(fm, template, G)
    imp = gi.group_importance(step, params, None, ms, template, split, G, 16)
    for dist in ("uniform", "global", "erk"):
        m1, _ = gi.proportional_masks(imp, None, template, params, 0.5, dist)
        m2, rep = gi.proportional_masks(imp, m1, template, params, 0.8, dist)
        k1 = sum(int(np.asarray(v).sum()) for _, v in named_leaves(m1))
        k2 = sum(int(np.asarray(v).sum()) for _, v in named_leaves(m2))
        total = sum(int(np.asarray(v).size) for _, v in named_leaves(m1))
        assert abs(k1 - 0.5 * total) <= len(list(named_leaves(m1))) and abs(k2 - 0.2 * total) <= 2
        for (_, a), (_, b) in zip(named_leaves(m1), named_leaves(m2)):
            assert not np.any((np.asarray(b) > 0) & (np.asarray(a) == 0))     # nothing pruned comes back
        assert rep["max_share_gap"] < 0.2


def test_options_fail_before_data():
    from fairprune_jax.running.runner import validate_config
    with pytest.raises(ValueError, match="keep_per_iter"):
        validate_config(RunConfig(method="fairgrape", dataset="digits", method_options={"keep_per_iter": 1.5}))
    with pytest.raises(ValueError, match="rank"):
        METHODS["fairgrape"].parse({"rank": "nope"})


def test_iteration_schedule_spreads_over_steps():
    from fairprune_jax.methods.fairgrape import iteration_steps
    at = iteration_steps(91, 22)
    assert sorted(i for v in at.values() for i in v) == list(range(91))
    assert min(at) == 0 and max(at) < 22
    assert iteration_steps(3, 0) == {0: [0, 1, 2]}


def test_run_end_to_end_exact_sparsity(tmp_path):
    """``fairprune run --method fairgrape`` on digits, small and fast."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fairprune_jax.running.cli", "run", "--method", "fairgrape", "--dataset", "digits",
           "--epochs", "1", "--finetune-epochs", "1", "--sparsity", "0.8", "--model-opt", "hidden=[16]",
           "--opt", "keep_per_iter=0.6", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "fairgrape"
    s = res["sparsity"]
    assert s["achieved"] == pytest.approx(0.8, abs=1e-3)
    info = res["method_info"]
    assert info["iterations"] == 4 and info["schedule"][-1] == 0.8       # 1 - 0.6^r: 0.4, 0.64, 0.784, 0.8
    assert info["cost"]["backward_passes"] == 4 * 10
    assert info["iteration_log"][-1]["max_share_gap"] < 0.05
