"""Two real processes on localhost (``jax.distributed`` over a free port, CPU collectives over gloo) give the
results of one process with two devices, with checkpoints on, and resume.

Each worker process calls the CLI twice, as a user would launch it (README, "Multi-process"):
``fairprune run ... --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I``, then the same with
``--resume`` (all phases restored from the final checkpoints: the resume barriers and the agreement on
what is on disk). The reference is one process with two virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``), the same global mesh. The data is a tiny CSV, so
the test costs imports and compilation, not training.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_compile_flags

TIMEOUT_S = 420

RUN = ["run", "--method", "magnitude", "--dataset", "csv", "--target", "label", "--protected", "grp",
       "--model", "mlp", "--model-opt", "hidden=(8,)", "--epochs", "2", "--finetune-epochs", "1",
       "--batch-size", "32", "--lr", "0.01", "--sparsity", "0.5", "--checkpoint-every", "3", "--no-progress"]

#: The same cell as RUN, as a one-cell `fairprune compare` grid.
GRID = """
dataset = "csv"
data_dir = "{data}"
out = "{out}"
methods = ["magnitude"]
sparsities = [0.5]
seeds = [0]
[dataset_options]
target = "label"
protected = "grp"
[model_options]
hidden = [8]
[run]
model = "mlp"
epochs = 2
finetune_epochs = 1
batch_size = 32
lr = 0.01
"""

WORKER = textwrap.dedent(r'''
    import sys, time
    from fairprune_jax.running.cli import main
    grid, argv = sys.argv[1], sys.argv[2:]
    t = time.perf_counter()
    rc = main(argv)
    print(f"FIRST rc={rc} seconds={time.perf_counter() - t:.1f}", flush=True)
    if rc:
        sys.exit(rc)
    t = time.perf_counter()
    rc = main(argv + ["--resume"])
    print(f"RESUME rc={rc} seconds={time.perf_counter() - t:.1f}", flush=True)
    if rc:
        sys.exit(rc)
    t = time.perf_counter()     # the same cell through `fairprune compare`, over the same two processes
    flags = argv[argv.index("--coordinator"):]
    rc = main(["compare", "--config", grid, "--no-progress", *flags])
    print(f"COMPARE rc={rc} seconds={time.perf_counter() - t:.1f}", flush=True)
    sys.exit(rc)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_csv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 320
    x = rng.normal(size=(n, 4))
    grp = rng.choice(["a", "b"], n, p=[0.6, 0.4])
    label = ((x[:, 0] + 0.5 * x[:, 1] + 0.3 * (grp == "b") + 0.3 * rng.normal(size=n)) > 0).astype(int)
    lines = ["x0,x1,x2,x3,grp,label"] + [f"{a:.4f},{b:.4f},{c:.4f},{d:.4f},{g},{y}"
                                         for (a, b, c, d), g, y in zip(x, grp, label)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(cache: Path, **extra: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    # the suite's compile setting (tests/conftest.py: no XLA backend optimisation) is kept, shared by the reference
    # and the workers; any other XLA flag of the caller is not
    same = fast_compile_flags(os.environ.get("XLA_FLAGS", ""))
    for k in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update(extra)
    if same:
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *same]).strip()
    return env


def _finish(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, tuple[int, str]]:
    """Wait for every process (killing all of them at the deadline); ``{name: (returncode, output)}``."""
    out = {}
    for name, p in procs.items():
        try:
            text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            text, _ = p.communicate()
            text += f"\n[killed after {TIMEOUT_S} s]"
        out[name] = (p.returncode, text)
    return out


def _report(outs: dict[str, tuple[int, str]]) -> str:
    return "\n".join(f"===== {name} (exit {rc}) =====\n{text[-3000:]}" for name, (rc, text) in outs.items())


def _numbers(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _numbers(v, f"{prefix}/{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _numbers(v, f"{prefix}/{i}")
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield prefix, float(d)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    data = _tiny_csv(tmp / "tiny.csv")
    args = [*RUN, "--data-dir", str(data)]
    t0 = time.monotonic()
    deadline = t0 + TIMEOUT_S
    # one process, two virtual devices: the reference (started first; the workers run beside it)
    procs = {"reference": subprocess.Popen(
        [sys.executable, "-m", "fairprune_jax.running.cli", *args, "--out", str(tmp / "ref")],
        env=_env(tmp / "xla-ref", XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)}
    grid = tmp / "grid.toml"
    grid.write_text(GRID.format(data=data.as_posix(), out=(tmp / "grid").as_posix()))
    port = _free_port()
    for i in range(2):
        procs[f"process {i}"] = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(grid), *args, "--out", str(tmp / "two"),
             "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            env=_env(tmp / f"xla-{i}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = _finish(procs, deadline)
    seconds = time.monotonic() - t0
    assert all(rc == 0 for rc, _ in outs.values()), _report(outs)
    return tmp, outs, seconds


def test_two_processes_equal_one_process_with_two_devices(launched):
    from fairprune_jax.training import checkpoint

    tmp, outs, seconds = launched
    ref = json.loads((tmp / "ref" / "results.json").read_text())
    two = json.loads((tmp / "two" / "results.json").read_text())
    assert ref["runtime"]["devices"] == 2 and ref["runtime"]["processes"] == 1
    assert two["runtime"]["devices"] == 2 and two["runtime"]["processes"] == 2
    assert two["runtime"]["resumed"] is True         # written by the --resume launch
    a = dict(_numbers({k: ref[k] for k in ("dense", "pruned", "sparsity")}))
    b = dict(_numbers({k: two[k] for k in ("dense", "pruned", "sparsity")}))
    assert a.keys() == b.keys() and len(a) > 100
    metrics_diff = max(abs(a[k] - b[k]) for k in a)
    sa, sb = checkpoint.read_final(tmp / "ref"), checkpoint.read_final(tmp / "two")
    assert sa["phase"] == sb["phase"] == "01-fine-tune"
    import jax
    la, lb = jax.tree.leaves(sa["state"]), jax.tree.leaves(sb["state"])
    assert len(la) == len(lb)
    state_diff = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(la, lb))
    print(f"\ntwo processes vs one process with two devices: max |metric diff| {metrics_diff:.3g}, "
          f"max |state diff| {state_diff:.3g}; all three processes took {seconds:.1f} s; process 0: "
          + ", ".join(ln for ln in outs["process 0"][1].splitlines() if " seconds=" in ln))
    for x, y in zip(jax.tree.leaves(sa["state"]["masks"]), jax.tree.leaves(sb["state"]["masks"])):
        np.testing.assert_array_equal(x, y)
    assert metrics_diff <= 1e-6 and state_diff <= 1e-6


def test_compare_over_two_processes_gives_the_same_cell(launched):
    tmp, outs, _ = launched
    ref = json.loads((tmp / "ref" / "results.json").read_text())
    cell = json.loads((tmp / "grid" / "cells" / "magnitude_s0.5_seed0" / "results.json").read_text())
    assert cell["runtime"]["processes"] == 2 and cell["runtime"]["devices"] == 2
    a = dict(_numbers({k: ref[k] for k in ("dense", "pruned", "sparsity")}))
    b = dict(_numbers({k: cell[k] for k in ("dense", "pruned", "sparsity")}))
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) <= 1e-6
    assert (tmp / "grid" / "results.md").is_file()
    assert "fairprune compare: process 1 of 2 finished" in outs["process 1"][1]
    assert "COMPARE rc=0" in outs["process 0"][1] and "results.csv" in outs["process 0"][1]


def test_only_process_zero_writes_and_reports(launched):
    tmp, outs, _ = launched
    rc0, out0 = outs["process 0"]
    rc1, out1 = outs["process 1"]
    assert "FIRST rc=0" in out0 and "RESUME rc=0" in out0 and "FIRST rc=0" in out1 and "RESUME rc=0" in out1
    assert out0.count("wrote ") == 3 and "results.json" in out0          # once per launch (run, resume, compare)
    assert "wrote " not in out1 and "accuracy" not in out1
    assert out1.count("process 1 of 2 finished; process 0 writes and reports the results") == 3
    assert "unfinished run" not in out0 + out1 and "Traceback" not in out0 + out1
    assert not list((tmp / "two").glob(".fairprune-write-test-*"))


# ---------------------------------------------------------------------------
# Settings: checked before JAX starts (cheap)
# ---------------------------------------------------------------------------

def test_process_settings_from_flags_or_environment():
    from fairprune_jax.training.distributed import process_settings

    want = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert process_settings("10.0.0.1:1234", "4", "3", env={}) == want
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert process_settings(env=env) == want
    assert process_settings(None, None, "1", env=env)["process_id"] == 1      # a flag beats its variable
    assert process_settings(env={}) == {}                                       # jax detects the cluster


@pytest.mark.parametrize("flags, env, msg", [
    (("h:1", None, None), {}, r"--coordinator given but not --num-processes \(or JAX_NUM_PROCESSES\), --process-id"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS given but not"),
    (("h:1", "2", "2"), {}, r"--process-id must be in \[0, 2\) for 2 processes; got 2"),
    (("h:1", "0", "0"), {}, "--num-processes must be >= 1"),
    (("h:1", "two", "0"), {}, "--num-processes must be an integer; got 'two'"),
    (("h:1", "2", "0"), {}, None),
    (("host", "2", "0"), {}, "--coordinator must be HOST:PORT"),
    ((None, "2", None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "x"}, "JAX_PROCESS_ID must be an integer"),
])
def test_bad_process_settings_are_named(flags, env, msg):
    from fairprune_jax.training.distributed import process_settings

    if msg is None:
        assert process_settings(*flags, env=env)["num_processes"] == 2
        return
    with pytest.raises(ValueError, match=msg):
        process_settings(*flags, env=env)


def test_cli_refuses_half_given_settings_before_jax_starts(capsys, monkeypatch, no_training):
    from fairprune_jax.running.cli import main

    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert main(["run", "--num-processes", "2", "--out", "unused"]) == 2
    assert "--num-processes given but not --coordinator" in capsys.readouterr().err
    assert main(["compare", "--config", "experiments/headline.toml", "--process-id", "5",
                 "--num-processes", "2", "--coordinator", "h:1"]) == 2
    assert "--process-id must be in [0, 2)" in capsys.readouterr().err
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert main(["run", "--out", "unused"]) == 2
    assert "JAX_NUM_PROCESSES set, but --distributed not given" in capsys.readouterr().err
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "OMPI_MCA_orte_hnp_uri",
              "TPU_SKIP_MDS_QUERY"):
        monkeypatch.delenv(k, raising=False)
    assert main(["run", "--distributed", "--out", "unused"]) == 2    # no cluster to detect here
    assert "fairprune: error: could not join the multi-process run (settings detected by jax" in capsys.readouterr().err


@pytest.mark.parametrize("change, named", [("setting", "sparsity differs"), ("data", "data differs")])
def test_processes_given_different_settings_or_data_refuse_to_train(tmp_path, change, named):
    """Process 1 started with another --sparsity (its copy of the data identical, under another path), or with a
    copy of the data whose labels differ: both processes stop before training with one message naming what
    differs (they trained a model none of the settings describe, reported under process 0's; or aborted in
    gloo over unequal sizes)."""
    data = _tiny_csv(tmp_path / "tiny.csv")
    other = tmp_path / "host1" / "tiny.csv"
    other.parent.mkdir()
    text = data.read_text()
    if change == "data":
        lines = text.splitlines()
        lines[1] = lines[1][:-1] + ("0" if lines[1].endswith("1") else "1")      # one label flipped
        text = "\n".join(lines) + "\n"
    other.write_text(text)
    port = _free_port()
    procs = {}
    for i, path in enumerate((data, other)):
        args = [*RUN, "--data-dir", str(path), "--out", str(tmp_path / "out")]
        if change == "setting" and i == 1:
            args[args.index("--sparsity") + 1] = "0.8"
        procs[f"process {i}"] = subprocess.Popen(
            [sys.executable, "-m", "fairprune_jax.running.cli", *args, "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            env=_env(tmp_path / f"xla-{i}"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = _finish(procs, time.monotonic() + TIMEOUT_S)
    for rc, text in outs.values():
        assert rc != 0 and f"were given different settings or data: {named}" in text, _report(outs)
        assert "between process 0 and process(es) 1" in text and "Terminating" not in text, _report(outs)
    assert not (tmp_path / "out" / "results.json").exists()
