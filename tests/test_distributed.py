"""Data parallelism on 8 (virtual) CPU devices gives the 1-device results.

The device count is fixed when JAX starts, so everything runs in one
subprocess with ``jax_num_cpu_devices = 8``; it prints one JSON line of
measurements that the tests below check. The runs go through the CLI
(``fairprune run --devices N --checkpoint-every ...``), and params, masks and
multipliers are read back from the final checkpoints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import contextlib, io, json, sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from fairprune_jax.constraints import constrained
    from fairprune_jax.metrics import fairness
    from fairprune_jax.training import checkpoint, distributed
    from fairprune_jax.running.cli import main

    out_root = sys.argv[1]
    res = {"devices": len(jax.devices())}
    mesh8 = distributed.make_mesh(8)

    # -- group counts and replay buffers of a sharded batch are those of the global batch
    rng = np.random.default_rng(0)
    B, G, C = 64, 12, 5
    logits = rng.normal(size=(B, C)).astype(np.float32)
    y = rng.integers(0, C, B).astype(np.int32)
    g = rng.integers(0, G - 2, B).astype(np.int32)    # the last two groups are absent
    g[:40] = 3                                          # more rows of one group than its buffer holds
    w = np.ones(B, np.float32); w[-5:] = 0              # padding rows
    loss = rng.random(B).astype(np.float32)
    batch = {"x": logits, "y": y, "g": g, "w": w, "l": loss}
    cnt = jax.jit(lambda b: fairness.group_counts(b["x"], b["y"], b["g"], G, loss=b["l"], weights=b["w"]))
    sh = distributed.shard_batch(batch, mesh8)
    res["batch_sharded"] = len(sh["x"].sharding.device_set) == 8 and not sh["x"].sharding.is_fully_replicated
    ref, got = cnt(batch), cnt(sh)
    res["counts_exact_fields_equal"] = all(
        bool(np.array_equal(np.asarray(getattr(ref, f)), np.asarray(getattr(got, f))))
        for f in ("n", "correct", "pred_pos", "tp", "fp", "pos", "neg"))
    res["counts_loss_max_abs_diff"] = float(np.max(np.abs(np.asarray(ref.loss_sum) - np.asarray(got.loss_sum))))
    upd = jax.jit(constrained.buffer_update)
    b_ref = upd(upd(constrained.buffer_init(G, 16), loss, g, w), loss[::-1].copy(), g, w)
    b_got = distributed.replicate(constrained.buffer_init(G, 16), mesh8)
    b_got = upd(b_got, sh["l"], sh["g"], sh["w"])
    b_got = upd(b_got, distributed.shard_batch({"v": loss[::-1].copy()}, mesh8)["v"], sh["g"], sh["w"])
    res["buffers_equal"] = all(bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in zip(b_ref, b_got))
    res["buffer_replicated"] = all(x.sharding.is_fully_replicated for x in b_got)
    try:
        distributed.shard_batch({k: v[:60] for k, v in batch.items()}, mesh8)
    except ValueError as e:
        res["indivisible_error"] = str(e)

    # -- CLI errors before any work
    errs = {}
    for name, argv in {"too_many": ["--devices", "9"], "indivisible": ["--devices", "8", "--batch-size", "60"]}.items():
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["run", "--dataset", "digits", "--no-progress", "--out", f"{out_root}/err", *argv])
        errs[name] = [rc, buf.getvalue().strip()]
    res["cli_errors"] = errs

    # -- end to end: ceag and magnitude on 1 and on 8 devices
    common = ["--dataset", "digits", "--epochs", "1", "--finetune-epochs", "2", "--no-progress", "--checkpoint-every", "100"]
    runs = {}
    for method in ("ceag", "magnitude"):
        for n in (1, 8):
            d = f"{out_root}/{method}_{n}"
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                rc = main(["run", "--method", method, "--devices", str(n), "--out", d, *common])
            assert rc == 0, (method, n, rc)
            r = json.load(open(f"{d}/results.json"))
            final = checkpoint.read_final(d)
            runs[(method, n)] = (r, final["state"])
            res[f"seconds_{method}_{n}"] = time.perf_counter() - t

    def flat(d, prefix=""):
        if isinstance(d, dict):
            for k, v in d.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(d, list):
            for i, v in enumerate(d):
                yield from flat(v, f"{prefix}/{i}")
        elif isinstance(d, (int, float)) and not isinstance(d, bool):
            yield prefix, float(d)

    def maxdiff(a, b):
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(a) == len(b)
        return max([float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(z, np.float64)))) for x, z in zip(a, b)]
                   + [0.0])

    for method in ("ceag", "magnitude"):
        (r1, s1), (r8, s8) = runs[(method, 1)], runs[(method, 8)]
        m1 = dict(flat({"dense": r1["dense"], "pruned": r1["pruned"]}))
        m8 = dict(flat({"dense": r8["dense"], "pruned": r8["pruned"]}))
        assert m1.keys() == m8.keys()
        mask_leaves = list(zip(jax.tree.leaves(s1["masks"]), jax.tree.leaves(s8["masks"])))
        res[method] = {
            "runtime_devices": [r1["runtime"]["devices"], r8["runtime"]["devices"]],
            "params_max_abs_diff": maxdiff(s1["params"], s8["params"]),
            "opt_state_max_abs_diff": maxdiff(s1["opt_state"], s8["opt_state"]),
            "masks_differing": int(sum(int(np.sum(a != b)) for a, b in mask_leaves)),
            "masks_total": int(sum(a.size for a, _ in mask_leaves)),
            "multipliers": [r1["method_info"].get("multipliers"), r8["method_info"].get("multipliers")],
            "multipliers_max_abs_diff": maxdiff(r1["method_info"].get("multipliers", []),
                                                r8["method_info"].get("multipliers", [])),
            "extra_max_abs_diff": maxdiff(s1["extra"], s8["extra"]),
            "metrics_max_abs_diff": max(abs(m1[k] - m8[k]) for k in m1),
            "metrics_compared": len(m1),
            "test_accuracy": [r1["pruned"]["test"]["accuracy"], r8["pruned"]["test"]["accuracy"]],
            "sparsity": [r1["sparsity"]["achieved"], r8["sparsity"]["achieved"]],
        }
    print("RESULT " + json.dumps(res))
''')


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore",
               JAX_COMPILATION_CACHE_DIR=str(tmp / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    # 8 virtual devices share two (busy) cores: a device thread can reach an all-reduce long after the others,
    # so XLA's default 40 s "stuck collective" termination is raised (a slow run, not a wrong one).
    env["XLA_FLAGS"] = ("--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                        "--xla_cpu_collective_timeout_seconds=600 " + os.environ.get("XLA_FLAGS", "")).strip()
    # (the suite's own flags too: tests/conftest.py compiles without XLA's backend optimisation, which both
    # the 1- and the 8-device runs share)
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    print(json.dumps(res, indent=1))   # the measured 8-vs-1 differences (pytest -s shows them)
    return res


def test_counts_and_buffers_of_a_sharded_batch_are_global(measured):
    assert measured["devices"] == 8 and measured["batch_sharded"]
    assert measured["counts_exact_fields_equal"]
    assert measured["counts_loss_max_abs_diff"] < 1e-5
    assert measured["buffers_equal"] and measured["buffer_replicated"]
    assert "batch size 60 is not divisible by the 8 devices" in measured["indivisible_error"]


def test_cli_device_errors(measured):
    e = measured["cli_errors"]
    assert e["too_many"][0] == 2 and "--devices 9: only 8 cpu device(s) are visible" in e["too_many"][1]
    assert e["indivisible"][0] == 2 and "--batch-size 60 is not divisible by the 8 devices" in e["indivisible"][1]


@pytest.mark.parametrize("method", ["ceag", "magnitude"])
def test_eight_devices_match_one(measured, method):
    r = measured[method]
    assert r["runtime_devices"] == [1, 8]
    assert r["masks_differing"] == 0 and r["masks_total"] > 0
    assert r["params_max_abs_diff"] < 1e-5, r
    assert r["opt_state_max_abs_diff"] < 1e-5, r
    assert r["extra_max_abs_diff"] < 1e-5, r
    assert r["multipliers_max_abs_diff"] < 1e-5, r
    assert r["metrics_max_abs_diff"] < 1e-5, r
    assert r["sparsity"][0] == r["sparsity"][1]
    if method == "ceag":   # the comparison covers moving multipliers, not just zeros
        assert max(r["multipliers"][0]) > 0
