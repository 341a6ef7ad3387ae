"""Pruning scores and sparsity schedules."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fairprune_jax.sparsity import masks as M
from fairprune_jax.sparsity import scores as S
from fairprune_jax.sparsity import schedules as SC


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
            "fc": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "fc2": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}


@pytest.fixture(scope="module")
def pt():
    p = _params()
    return p, M.prunable_template(p)


# ---------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------

def test_magnitude_is_abs(pt):
    p, t = pt
    s = S.magnitude(p, t)
    for name in ("conv", "fc", "fc2"):
        np.testing.assert_array_equal(np.asarray(s[name]["kernel"]), np.abs(np.asarray(p[name]["kernel"])))
    assert s["fc"]["bias"] is None


def test_saliency_is_abs_w_times_g(pt):
    p, t = pt
    g = jax.tree.map(lambda x: x * 0 + jnp.linspace(-2.0, 3.0, x.size).reshape(x.shape), _params(1))
    s = S.saliency(p, g, t)
    for name in ("conv", "fc", "fc2"):
        np.testing.assert_allclose(np.asarray(s[name]["kernel"]),
                                   np.abs(np.asarray(p[name]["kernel"]) * np.asarray(g[name]["kernel"])),
                                   rtol=1e-6)
    assert s["fc"]["bias"] is None


def test_random_scores_reproducible_and_independent_per_leaf(pt):
    p, t = pt
    a = S.random(jax.random.key(0), p, t)
    b = S.random(jax.random.key(0), p, t)
    c = S.random(jax.random.key(1), p, t)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a["fc"]["kernel"]), np.asarray(c["fc"]["kernel"]))
    # two leaves of the same shape get different streams
    assert not np.array_equal(np.asarray(a["fc"]["kernel"]), np.asarray(a["fc2"]["kernel"]))
    chex.assert_trees_all_equal_shapes(
        {k: v["kernel"] for k, v in a.items()}, {k: v["kernel"] for k, v in p.items()})
    for _, v in M.named_leaves(a):
        v = np.asarray(v)
        assert v.min() >= 0.0 and v.max() < 1.0
    assert a["fc"]["bias"] is None
    # random scores give an exact, key-dependent random mask
    m0 = M.masks_from_scores(a, t, 0.5)
    m1 = M.masks_from_scores(c, t, 0.5)
    assert int(np.asarray(m0["conv"]["kernel"]).sum()) == 36
    assert not np.array_equal(np.asarray(m0["conv"]["kernel"]), np.asarray(m1["conv"]["kernel"]))


def test_l1_structured_shape_and_values(pt):
    p, t = pt
    s = S.l1_structured(p, t)
    assert s["conv"]["kernel"].shape == (4,)
    assert s["fc"]["kernel"].shape == (4,)
    np.testing.assert_allclose(np.asarray(s["conv"]["kernel"]),
                               np.abs(np.asarray(p["conv"]["kernel"])).sum(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s["fc"]["kernel"]), np.abs(np.asarray(p["fc"]["kernel"])).sum(0),
                               rtol=1e-5)
    assert s["fc"]["bias"] is None


def test_scores_registry():
    assert set(S.SCORES) >= {"magnitude", "random", "saliency", "l1_structured"}


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------

def zhu_gupta(t, s_i, s_f, t0, n):
    """s_t = s_f + (s_i - s_f) (1 - (t - t0) / n)^3 for t0 <= t <= t0 + n (Zhu & Gupta 2017, eq. 1)."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / n) ** 3


def test_cubic_endpoints_and_formula():
    assert SC.cubic(0, 0.9, 100) == 0.0
    assert SC.cubic(100, 0.9, 100) == pytest.approx(0.9)
    assert SC.cubic(10_000, 0.9, 100) == pytest.approx(0.9)
    assert SC.cubic(-5, 0.9, 100) == 0.0
    for t in (1, 25, 50, 99):
        assert SC.cubic(t, 0.9, 100) == pytest.approx(zhu_gupta(t, 0.0, 0.9, 0, 100), abs=1e-12)
    # half way: s_f - s_f / 8
    assert SC.cubic(50, 0.8, 100) == pytest.approx(0.8 * (1 - 0.125))
    # initial sparsity and a begin step
    assert SC.cubic(10, 0.9, 40, initial_sparsity=0.5, begin_step=10) == pytest.approx(0.5)
    assert SC.cubic(5, 0.9, 40, initial_sparsity=0.5, begin_step=10) == pytest.approx(0.5)
    assert SC.cubic(30, 0.9, 40, initial_sparsity=0.5, begin_step=10) == pytest.approx(
        zhu_gupta(30, 0.5, 0.9, 10, 40))
    assert SC.cubic(50, 0.9, 40, initial_sparsity=0.5, begin_step=10) == pytest.approx(0.9)
    # degenerate schedule
    assert SC.cubic(0, 0.7, 0) == 0.7


@settings(deadline=None, max_examples=50)
@given(s_f=st.floats(0.0, 0.99), total=st.integers(1, 500), s_i=st.floats(0.0, 0.5))
def test_cubic_monotone_and_bounded(s_f, total, s_i):
    s_i = min(s_i, s_f)
    vals = [SC.cubic(t, s_f, total, initial_sparsity=s_i) for t in range(-2, total + 3)]
    assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:]))
    assert vals[0] == pytest.approx(s_i) and vals[-1] == pytest.approx(s_f)
    assert all(s_i - 1e-12 <= v <= s_f + 1e-12 for v in vals)
    # the increments shrink: most pruning happens early (cubic is concave here)
    incs = np.diff(vals[2:total + 3])
    assert np.all(np.diff(incs) <= 1e-12)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_cubic_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        SC.cubic(0, bad, 10)


@settings(deadline=None, max_examples=50)
@given(s_f=st.floats(0.0, 0.99), total=st.integers(0, 300), freq=st.integers(-1, 400))
def test_cubic_steps_end_on_target(s_f, total, freq):
    pts = SC.cubic_steps(s_f, total, freq)
    steps = [t for t, _ in pts]
    vals = [v for _, v in pts]
    assert pts[-1] == (max(total, 0), pytest.approx(s_f))
    assert steps == sorted(set(steps))                  # strictly increasing, no duplicates
    assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:]))
    f = max(freq, 1)
    assert all(t % f == 0 for t in steps[:-1])
    for t, v in pts:
        assert v == pytest.approx(SC.cubic(t, s_f, total)) or t == total


def test_cubic_steps_example():
    pts = SC.cubic_steps(0.8, 10, 4)
    assert [t for t, _ in pts] == [4, 8, 10]
    assert pts[0][1] == pytest.approx(0.8 - 0.8 * 0.6 ** 3)
    assert pts[-1][1] == pytest.approx(0.8)


def test_iterative_rounds_values():
    r = SC.iterative_rounds(0.9)
    n = math.ceil(math.log(0.1) / math.log(0.8))
    assert len(r) == n == 11
    for i, v in enumerate(r[:-1], start=1):
        assert v == pytest.approx(1 - 0.8 ** i)
    assert r[-1] == 0.9
    assert all(b > a for a, b in zip(r, r[1:]))
    # an exact power lands on its round without an extra one
    assert SC.iterative_rounds(1 - 0.8 ** 3) == pytest.approx([0.2, 0.36, 0.488])
    assert SC.iterative_rounds(0.5, fraction=0.5) == [0.5]
    assert SC.iterative_rounds(0.1) == [0.1]               # first round clipped to the target
    assert SC.iterative_rounds(0.0) == []
    assert SC.iterative_rounds(1e-12) == [1e-12]           # tiny target: still one round (was IndexError)
    r = SC.iterative_rounds(0.95, fraction=0.3)
    assert r[:-1] == pytest.approx([1 - 0.7 ** i for i in range(1, len(r))])
    assert r[-1] == 0.95 and r[-2] < 0.95


@settings(deadline=None, max_examples=50)
@given(s=st.floats(0.0, 0.99), frac=st.floats(0.05, 0.95))
def test_iterative_rounds_property(s, frac):
    r = SC.iterative_rounds(s, frac)
    if s == 0:
        assert r == []
        return
    assert r[-1] == s
    assert all(b > a for a, b in zip(r, r[1:]))
    assert all(v == pytest.approx(1 - (1 - frac) ** i) for i, v in enumerate(r[:-1], start=1))
    # no round is wasted: the round before the last is still short of the target
    if len(r) > 1:
        assert r[-2] < s


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.2, 1.5])
def test_iterative_rounds_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        SC.iterative_rounds(0.9, frac)


@pytest.mark.parametrize("bad", [1.0, -0.1])
def test_iterative_rounds_and_one_shot_reject_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        SC.iterative_rounds(bad)
    with pytest.raises(ValueError, match="sparsity"):
        SC.one_shot(bad)


def test_one_shot():
    assert SC.one_shot(0.9) == [0.9]
