"""One command for a GPU / TPU machine: step cost of CEAG vs plain fine-tuning for 2-1000 groups, vmapped seeds,
and a short UTKFace CEAG run, written to one JSON.

    python benchmarks/make_utkface_npz.py --data-dir DIR      # once, anywhere: a <= 60 MB uint8 .npz
    python benchmarks/accelerator.py --npz benchmarks/data/utkface32.npz      # on the accelerator machine
    python benchmarks/accelerator.py --smoke                  # CPU, well under a minute (the test suite runs it)

Needs only this package (and what a standard JAX GPU image holds): no TensorFlow, no PyTorch, no network.
Sections (each timed; an error in one is recorded in the JSON and the others still run; a section that
would start after ``--budget-s`` seconds is skipped and marked so):

1. ``step``: one optimizer step (batch ``--batch-size``, 90% unstructured sparsity on every kernel, synthetic
   inputs) of plain masked fine-tuning vs our CEAG step, for G = 2, 10, 100, 1000, built and timed by
   ``benchmarks/ceag_step.py`` (``bench_model``: interleaved rounds, median ms/step, compile time). Models:
   ``mlp`` (256-128 on Adult-sized rows), ``cnn`` (32-64-128 on 32x32x3), ``resnet`` = our CIFAR ResNet-20
   (width 16, 0.27 M params; the package has no ImageNet ResNet-18, so this is the ResNet used).
2. ``vmap_seeds``: ``benchmarks/vmap_seeds.py`` (1 seed vs 8 seeds vmapped into one program: a step and a
   dense ``fit``), for the MLP and the CNN (``vmap_seeds.main`` in this process).
3. ``utkface``: UTKFace from the ``.npz`` (target race; protected ``--protected``, default race), the CNN,
   dense training, then ``nft`` and ``ceag`` (``constraint_data=train``, eps 0.02) at 90%: wall time per
   phase, test accuracy, max psi_g and the certificate's verdict counts.

``--smoke`` shrinks everything (the MLP step at G = 2, one round; 2 vmapped seeds of a 16-unit MLP; ceag only,
on a synthetic 160-image 8x8 "UTKFace" when no ``--npz`` is given, a one-conv CNN, 1 epoch) so every path but
the CNN / ResNet steps runs on a CPU; almost all of its time is XLA compilation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402

RACES = ["White", "Black", "Asian", "Indian", "Others"]
GENDERS = ["male", "female"]


def environment() -> dict:
    d = jax.devices()
    return {"backend": jax.default_backend(), "devices": len(d), "device_kind": d[0].device_kind,
            "jax": jax.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count()}


# ----------------------------------------------------------------------------------------------------------
# 1. CEAG vs plain step
# ----------------------------------------------------------------------------------------------------------

def step_section(args, deadline: float) -> dict:
    import ceag_step as cs
    cs.SETTINGS.setdefault("resnet", {"input_shape": (32, 32, 3), "num_classes": 5,
                                      "what": "CIFAR ResNet-20 (width 16) on 32x32x3 images, 5 classes"})
    # (steps per round, rounds) on an accelerator: enough steps that a round is not one kernel launch
    schedule = {"mlp": (50, 10), "cnn": (20, 10), "resnet": (20, 10)}
    models = ["mlp"] if args.smoke else [m.strip() for m in args.models.split(",") if m.strip()]
    groups = [2] if args.smoke else [int(g) for g in args.groups.split(",")]
    out: dict = {"groups": groups, "batch_size": args.batch_size, "models": {}}
    for model in models:
        if time.time() > deadline:
            out["models"][model] = {"skipped": "time budget"}
            continue
        steps, rounds = (1, 1) if args.smoke else schedule.get(model, (10, 5))
        ns = argparse.Namespace(quick=False, steps=steps, repeats=rounds, batch_size=args.batch_size,
                                sparsity=0.9, seed=0)
        try:
            out["models"][model] = cs.bench_model(model, groups, ns, None)
        except Exception as e:  # noqa: BLE001 - recorded, the other sections still run
            out["models"][model] = {"error": repr(e), "traceback": traceback.format_exc(limit=6)}
    return out


# ----------------------------------------------------------------------------------------------------------
# 2. vmapped seeds
# ----------------------------------------------------------------------------------------------------------

def vmap_section(args, deadline: float) -> dict:
    import vmap_seeds
    out: dict = {}
    runs = [("mlp", ["--seeds", "2", "--rounds", "1", "--steps", "1", "--epochs", "1", "--hidden", "16"])] \
        if args.smoke else [("mlp", ["--seeds", "8", "--rounds", "5", "--steps", "30", "--epochs", "2"]),
                            ("cnn", ["--seeds", "8", "--rounds", "3", "--steps", "10", "--epochs", "1"])]
    with tempfile.TemporaryDirectory() as tmp:
        for model, extra in runs:
            if time.time() > deadline:
                out[model] = {"skipped": "time budget"}
                continue
            path = Path(tmp) / f"{model}.json"
            try:
                vmap_seeds.main(["--model", model, "--out", str(path), *extra])
                out[model] = next(iter(json.loads(path.read_text()).values()))
            except Exception as e:  # noqa: BLE001
                out[model] = {"error": repr(e), "traceback": traceback.format_exc(limit=6)}
                continue
            out[model]["command"] = " ".join(["python benchmarks/vmap_seeds.py", "--model", model, *extra])
    return out


# ----------------------------------------------------------------------------------------------------------
# 3. UTKFace CEAG run from the .npz
# ----------------------------------------------------------------------------------------------------------

def synthetic_npz(path: Path, n: int = 160, size: int = 8, seed: int = 0) -> None:
    """A stand-in with the keys of ``make_utkface_npz.py`` (random images; labels tied weakly to a colour)."""
    rng = np.random.default_rng(seed)
    race = rng.integers(0, 5, n).astype(np.uint8)
    gender = rng.integers(0, 2, n).astype(np.uint8)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    images[..., 0] = np.clip(images[..., 0].astype(int) // 2 + 25 * race[:, None, None], 0, 255).astype(np.uint8)
    np.savez_compressed(path, images=images, age=rng.integers(1, 90, n).astype(np.uint8), gender=gender, race=race,
                        names=np.asarray([f"synthetic_{i}" for i in range(n)]), subset=np.asarray(1.0),
                        size=np.asarray(size))


def dataset_from_npz(path: Path, protected: str = "race", seed: int = 0):
    """A :class:`Dataset` (target race) from the ``.npz``, split 80/20 stratified by group and label."""
    from fairprune_jax.data.base import Dataset, image_splits, stratified_split
    z = np.load(path)
    images, race, gender = z["images"], z["race"].astype(np.int64), z["gender"].astype(np.int64)
    if protected == "race":
        g, names = race, RACES
    elif protected in ("race,gender", "race_gender"):
        g, names = race * 2 + gender, [f"{r}|{s}" for r in RACES for s in GENDERS]
    elif protected == "gender":
        g, names = gender, GENDERS
    else:
        raise ValueError(f"--protected must be race, gender or race,gender; got {protected!r}")
    present = np.unique(g)
    remap = -np.ones(len(names), np.int64)
    remap[present] = np.arange(len(present))
    g, names = remap[g].astype(np.int32), [names[i] for i in present]
    y = race.astype(np.int32)
    train_idx, test_idx = stratified_split(y, g, 0.2, seed=seed)
    splits, meta = image_splits({"train": (images[train_idx], y[train_idx], g[train_idx]),
                                 "test": (images[test_idx], y[test_idx], g[test_idx])})
    return Dataset(name="utkface", train=splits["train"], test=splits["test"], group_names=names,
                   group_attrs=protected.split(","), class_names=list(RACES),
                   meta={"source": str(path), "rows": int(len(y)), "subset": float(z["subset"]) if "subset" in z else 1.0,
                         **meta})


def utkface_section(args, deadline: float) -> dict:
    from fairprune_jax.methods import RunConfig
    from fairprune_jax.running.runner import prepare, run_method
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.npz) if args.npz else None
        if path is None or not path.exists():
            if not args.smoke:
                raise FileNotFoundError(f"--npz {args.npz!r} not found; build it with benchmarks/make_utkface_npz.py")
            path = Path(tmp) / "synthetic.npz"
            synthetic_npz(path)
            out["data"] = "synthetic stand-in (--smoke without --npz)"
        t = time.perf_counter()
        ds = dataset_from_npz(path, args.protected)
        out.update(load_s=time.perf_counter() - t, train_rows=len(ds.train), test_rows=len(ds.test),
                   groups=list(ds.group_names), npz=str(path.name), subset=ds.meta["subset"])
        if args.smoke:
            run = dict(epochs=1, finetune_epochs=1, batch_size=32, model_options={"channels": [4], "hidden": 4})
        else:
            run = dict(epochs=args.epochs, finetune_epochs=args.finetune_epochs, batch_size=128,
                       model_options={"channels": [32, 64, 128], "hidden": 128})
        cfg = RunConfig(method="nft", dataset="utkface", model="cnn", lr=0.002, sparsity=0.9, progress=False,
                        certify_eps=0.02, **run)
        t = time.perf_counter()
        prep = prepare(cfg, dataset=ds)
        out["dense_s"] = time.perf_counter() - t
        dense = prep.dense_evals["test"][0]
        out["dense_test_accuracy"] = float(dense.correct.sum() / dense.n.sum())
        out["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k in run or k in ("lr", "sparsity")}
        methods = (("nft", {"prune_epochs": 1}),
                   ("ceag", {"prune_epochs": 1, "eps": 0.02, "constraint_data": "train", "select": "last"}))
        for method, opts in methods[1:] if args.smoke else methods:
            if time.time() > deadline:
                out[method] = {"skipped": "time budget"}
                continue
            t = time.perf_counter()
            res = run_method(prep, method=method, method_options=opts)
            test = res["pruned"]["test"]
            cert = test["certificate"]
            out[method] = {"wall_s": time.perf_counter() - t, "method_s": res["timings"]["method_s"],
                           "options": opts, "test_accuracy": test["accuracy"],
                           "max_psi": test["excess_accuracy_gap"]["max"],
                           "sparsity": res["sparsity"]["achieved"],
                           **{f"certificate_{k}": (len(cert[k]) if isinstance(cert.get(k), list) else cert.get(k))
                              for k in ("holds", "violated", "undetermined")}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="shrink everything so it runs on a CPU in well under a minute")
    ap.add_argument("--npz", default=str(HERE / "data" / "utkface32.npz"), help="from make_utkface_npz.py")
    ap.add_argument("--protected", default="race", help="race, gender or race,gender")
    ap.add_argument("--models", default="mlp,cnn,resnet")
    ap.add_argument("--groups", default="2,10,100,1000")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6, help="UTKFace dense epochs")
    ap.add_argument("--finetune-epochs", type=int, default=4, help="UTKFace fine-tuning epochs")
    ap.add_argument("--sections", default="step,vmap_seeds,utkface")
    ap.add_argument("--budget-s", type=float, default=540.0, help="no section or model starts after this many seconds")
    ap.add_argument("--out", default=str(HERE / "results" / "accelerator.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch_size = min(args.batch_size, 16)
        if args.npz == str(HERE / "data" / "utkface32.npz"):
            args.npz = None
    t0 = time.time()
    deadline = t0 + args.budget_s
    res: dict = {"environment": environment(), "smoke": bool(args.smoke),
                 "command": "python benchmarks/accelerator.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "sections": {}}
    fns = {"step": step_section, "vmap_seeds": vmap_section, "utkface": utkface_section}
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in fns:
            raise SystemExit(f"unknown section {name!r}; valid: {', '.join(fns)}")
        if time.time() > deadline:
            res["sections"][name] = {"skipped": "time budget"}
            continue
        t, cpu = time.perf_counter(), time.process_time()
        try:
            res["sections"][name] = fns[name](args, deadline)
        except Exception as e:  # noqa: BLE001
            res["sections"][name] = {"error": repr(e), "traceback": traceback.format_exc(limit=8)}
        res["sections"][name]["seconds"] = time.perf_counter() - t
        res["sections"][name]["cpu_seconds"] = time.process_time() - cpu
        print(f"[{name}] {res['sections'][name]['seconds']:.1f} s (cpu {res['sections'][name]['cpu_seconds']:.1f} s)"
              + (f"  ERROR {res['sections'][name]['error']}" if "error" in res["sections"][name] else ""), flush=True)
    res["total_s"] = time.time() - t0
    if args.out:
        p = Path(args.out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"wrote {p} ({res['total_s']:.1f} s)")
    return 1 if any("error" in s for s in res["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
