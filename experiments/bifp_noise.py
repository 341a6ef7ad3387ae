"""How noisy is the strict (hard) fairness estimate that drives BiFP's dual step?

For each comparison config given, the dense model of seed 0 is trained as the grid trains it, its hard
per-row values (predicted positive for dp/eo, error for ap) are computed once on the whole train split,
and the training batches of a few epochs (batch size of the config, a fresh shuffle per epoch) are
replayed through two estimators, compared with the same quantity on the whole split:

* the earlier one: a ring buffer of the last ``buffer`` rows per (side, group), max-min gap over the groups
  with a full buffer, worst side; a perfectly fair model would read the noise alone;
* the moving counts of ``constraint = "per_group"``: ``r_a - r`` per (side, group) from decayed sums
  (``strict_decay`` d), observed once a group has ``min_rows`` effective rows.

Reported per estimator: mean of the estimate and its error against the full-split value (RMS over the
steps after the first epoch, the worst observed constraint). Writes ``experiments/results/bifp_noise/``.

    python experiments/bifp_noise.py experiments/bifp_adult_sex.toml [more configs ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fairprune_jax.running.compare import load_config
from fairprune_jax.methods.base import RunConfig

EPOCHS = 4
BUFFER = 40
DECAYS = (0.9, 0.99, 0.995)
MIN_ROWS = 200.0


def hard_values(cfg_path: str):
    """(values, side, group, sides, groups, name, batch size) on the train split of seed 0's dense model."""
    import jax

    from fairprune_jax.running import runner
    from fairprune_jax.data.base import eval_batches
    from fairprune_jax.sparsity.masks import apply_masks  # noqa: F401  (dense: no masks)

    cc = load_config(cfg_path)
    run = {k: v for k, v in cc.run.items() if k != "save_compact"}
    cfg = RunConfig(dataset=cc.dataset, data_dir=cc.data_dir, seed=0, sparsity=cc.sparsities[0],
                    method="structured_magnitude", dataset_options=dict(cc.dataset_options),
                    model_options=dict(cc.model_options), progress=False, **run)
    prep = runner.prepare(cfg)
    ds, fm, dense = prep.dataset, prep.ctx.fm, prep.dense
    split = ds.train
    fwd = jax.jit(lambda p, ms, x: fm.apply(p, ms, x, train=False)[0])
    logits = np.concatenate([np.asarray(fwd(dense.params, dense.model_state, b["x"]))
                             for b in eval_batches(split, 512)])[:len(split)]
    pred = logits.argmax(-1)
    y, g = np.asarray(split.y), np.asarray(split.g)
    binary = ds.num_classes == 2
    pos = cfg.positive_label
    if binary:                      # equalized odds: predicted positive, sides y = pos / y != pos
        v, side, sides = (pred == pos).astype(float), (y != pos).astype(int), 2
    else:                           # accuracy parity: error rate, one side
        v, side, sides = (pred != y).astype(float), np.zeros_like(y), 1
    return v, side, g, sides, ds.num_groups, cc.name, cfg.batch_size


def simulate(v, side, g, sides, groups, bs, seed=0):
    rng = np.random.default_rng(seed)
    n = len(v)
    idx = side * groups + g
    k = sides * groups
    true_n = np.bincount(idx, minlength=k).astype(float)
    true_s = np.bincount(idx, weights=v, minlength=k)
    true_rate = true_s / np.maximum(true_n, 1)
    tn, ts = true_n.reshape(sides, groups), true_s.reshape(sides, groups)
    true_dev = (true_rate.reshape(sides, groups) - (ts.sum(1) / tn.sum(1))[:, None]).ravel()
    present = (tn > 0)
    gaps = [np.ptp(true_rate.reshape(sides, groups)[s][present[s]]) for s in range(sides)]
    true_gap = max(gaps)
    bufs = [[] for _ in range(k)]
    ema = {d: (np.zeros(k), np.zeros(k)) for d in DECAYS}
    old_est, new_err, new_obs = [], {d: [] for d in DECAYS}, {d: [] for d in DECAYS}
    steps_per_epoch = int(np.ceil(n / bs))
    for ep in range(EPOCHS):
        perm = rng.permutation(n)
        for i in range(steps_per_epoch):
            b = perm[i * bs:(i + 1) * bs]
            for j in b:
                buf = bufs[idx[j]]
                buf.append(v[j])
                if len(buf) > BUFFER:
                    buf.pop(0)
            full = np.array([len(x) == BUFFER for x in bufs]).reshape(sides, groups)
            means = np.array([np.mean(x) if x else 0.0 for x in bufs]).reshape(sides, groups)
            side_gaps = [np.ptp(means[s][full[s]]) for s in range(sides) if full[s].sum() >= 2]
            cnt = np.bincount(idx[b], minlength=k).astype(float)
            sm = np.bincount(idx[b], weights=v[b], minlength=k)
            for d in DECAYS:
                en, es = ema[d]
                en, es = d * en + cnt, d * es + sm
                ema[d] = (en, es)
                if ep == 0:
                    continue
                nn, ss = en.reshape(sides, groups), es.reshape(sides, groups)
                dev = (ss / np.maximum(nn, 1e-12) - (ss.sum(1) / nn.sum(1))[:, None]).ravel()
                obs = en >= MIN_ROWS
                new_err[d].append(np.where(obs, dev - true_dev, np.nan))
                new_obs[d].append(obs)
            if ep > 0 and side_gaps:
                old_est.append(max(side_gaps))
    out = {"true_gap": float(true_gap), "old_buffer_gap_mean": float(np.mean(old_est)),
           "old_buffer_gap_rms_error": float(np.sqrt(np.mean((np.asarray(old_est) - true_gap) ** 2))),
           "steps_per_epoch": steps_per_epoch,
           "group_rows": true_n.astype(int).tolist()}
    for d in DECAYS:
        err = np.asarray(new_err[d])
        obs = np.asarray(new_obs[d])
        rms = np.sqrt(np.nanmean(err ** 2, axis=0))            # per constraint
        out[f"ema{d}"] = {"worst_rms_error": float(np.nanmax(rms)) if np.isfinite(rms).any() else None,
                          "median_rms_error": float(np.nanmedian(rms)) if np.isfinite(rms).any() else None,
                          "observed_fraction": float(obs.mean())}
    return out


def main(paths):
    out_dir = Path(__file__).parent / "results" / "bifp_noise"
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / "noise.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    for p in paths:
        v, side, g, sides, groups, name, bs = hard_values(p)
        results[name] = {"config": str(Path(p).as_posix()), "sides": sides, "groups": groups, "batch_size": bs,
                         **simulate(v, side, g, sides, groups, bs)}
        print(name, json.dumps(results[name]), flush=True)
        res_path.write_text(json.dumps(results, indent=1))
    lines = ["| grid | groups x sides | batch | hard gap, whole train split | 40-row buffers: mean gap read "
             "(RMS error) | moving counts d=0.9 | d=0.99 | d=0.995 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = []
        for d in DECAYS:
            e = r[f"ema{d}"]
            cells.append("n/a" if e["worst_rms_error"] is None else
                         f"{e['worst_rms_error']:.3f} / {e['median_rms_error']:.3f} ({e['observed_fraction']:.0%})")
        lines.append(f"| {name} | {r['groups']} x {r['sides']} | {r['batch_size']} | {r['true_gap']:.3f} | "
                     f"{r['old_buffer_gap_mean']:.3f} ({r['old_buffer_gap_rms_error']:.3f}) | " + " | ".join(cells)
                     + " |")
    (out_dir / "noise.md").write_text(
        "Strict-estimate noise of the dense model (seed 0), epochs 2-4 of replayed training batches.\n"
        "Moving counts: worst / median over constraints of the RMS error of r_a - r against the whole "
        f"train split (fraction of constraint-steps observed, min_rows = {MIN_ROWS:g}).\n"
        "Reproduce: python experiments/bifp_noise.py " + " ".join(Path(p).as_posix() for p in paths) + "\n\n"
        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
