"""A run's output folder: held by one run at a time (a lock file naming the run), checked to be writable before
any data loads, and replaced safely (an earlier run's outputs, :data:`OUTPUT_ENTRIES`, are set aside as a whole
while a new run works there, put back if it fails and dropped when it succeeds). Also the JSON-able copy of what a run records (:func:`_jsonable`).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fairprune_jax.core.config import RunConfig
from fairprune_jax.core.notices import warn
from fairprune_jax.training import distributed


#: The file that marks an output folder as in use by a run (removed when the run ends, however it ends).
LOCK_FILE = ".fairprune-run.lock"


@contextlib.contextmanager
def owning_folder(out: str | os.PathLike | None):
    """The run holds ``out`` for as long as the block runs: a second run into the same folder (with or without
    checkpoints) is refused at once, naming the first (its process id, host and start time). A lock left by a
    killed run on this host (its process is gone) is taken over; one from another host is not guessed at."""
    if not out or not distributed.is_primary():
        yield
        return
    import json
    import socket
    lock = Path(out) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text())
            except (OSError, ValueError):
                other = {}
            if other.get("host") == me["host"] and not _process_alive(other.get("pid")):
                lock.unlink(missing_ok=True)          # left by a run that was killed: take it over
                continue
            raise ValueError(f"--out {out} is in use by another fairprune run (process {other.get('pid', '?')} on "
                             f"{other.get('host', '?')}, started {other.get('started', '?')}); wait for it to end or "
                             f"choose another --out. If no such run is going, delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _process_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


#: Everything a run writes into its output folder, files and folders alike: set aside as a whole when a new run
#: starts there, put back as a whole if it fails, dropped when it succeeds, so that the folder never mixes two
#: runs (a 0.9 model in ``compact/`` beside 0.5 results, rounds of two LTH runs in ``rounds/``). A new writer
#: into the folder adds its name here (tests/test_output_folder.py checks the ones it can find).
#: ``checkpoints/`` is not one: it is a run's own state, kept for ``--resume``; nor is the lock file.
OUTPUT_ENTRIES = ("results.json", "results.md", "group_accuracy.png", "constraints.png",  # report.write_outputs
                  "tensorboard",      # fairprune run --tensorboard (tracking.TensorBoard)
                  "compact",          # --save-compact (runner.COMPACT_DIR)
                  "rounds",           # lth and its variants: each round's masks (Context.save_masks)
                  "ballot")           # ballot: the voting run's masks (Context.save_masks)
#: Written by a run as it goes (a round's masks, the votes): a run resumed from its checkpoints keeps its own
#: earlier ones in place (its results refer to them; its killed part wrote them and will not write them again).
RESUMED_ENTRIES = ("rounds", "ballot")
#: The result files among them (the name earlier versions exported).
OUTPUT_FILES = OUTPUT_ENTRIES[:4]
#: Where an earlier run's outputs wait while a new run works in the same folder.
ASIDE_DIR = ".previous-results"


def check_out_dir(out: str | Path) -> None:
    """``out`` must be a folder this process can create and write into: checked before any data is loaded."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder; choose a folder for the run's outputs")
    if (out / "cells").is_dir():
        raise ValueError(f"--out {out} is the folder of a comparison (it holds {out / 'cells'}): a run into it would "
                         "replace the grid's results.json and results.md; choose another --out")
    from fairprune_jax.training.checkpoint import CHECKPOINT_DIR
    ck = out / CHECKPOINT_DIR           # made when the first checkpoint is written, a minute or more into the run
    if ck.exists() and not ck.is_dir():
        raise ValueError(f"--out {out} holds a file named {CHECKPOINT_DIR}, where the run keeps its checkpoints (a "
                         "folder); move it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".fairprune-write-test-{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} is not a folder fairprune can write into ({e.strerror or e}); choose "
                         "another --out") from None


def set_aside_outputs(out: Path, keep: tuple = (), own_results: bool = False) -> Path | None:
    """Move an earlier run's outputs (every :data:`OUTPUT_ENTRIES` file and folder) out of ``out`` into
    ``out/.previous-results`` as this run starts (process 0), so that nothing beside this run's checkpoints is
    ever an older run's, yet nothing is lost until this run's own results are written: :func:`restore_outputs`
    puts them back if it fails. Returns the folder (None when there was nothing to set aside). A folder left
    by a run killed with -9 holds the outputs of the run before it: they are kept, not overwritten, until a
    run finishes (the killed run's partial outputs in ``out`` go). ``keep``: entries left in place (a resumed
    run's :data:`RESUMED_ENTRIES`). A results.json found is named in a warning (this run will replace it) unless
    ``own_results``: a finished run resumed to add to it. A resumed run that had not finished warns too: the
    results beside its checkpoints are the run's before it, which an interrupt had put back."""
    if not distributed.is_primary():
        return None
    aside = out / ASIDE_DIR
    found = [name for name in OUTPUT_ENTRIES if _present(out / name) and name not in keep]
    if aside.is_dir() and not any(_present(aside / n) for n in OUTPUT_ENTRIES):
        shutil.rmtree(aside, ignore_errors=True)
    held = aside.is_dir() and _present(aside / "results.json")    # set aside by a run killed before it finished
    if not own_results and (held or "results.json" in found):
        where = aside if held else out
        warn(f"--out {out} holds an earlier run's results ({_describe(where / 'results.json')}"
             f"{f', in {ASIDE_DIR}/ since a later run into it stopped before it finished' if held else ''}): this "
             f"run replaces them when it finishes (until then they wait in {ASIDE_DIR}/, and come back if it "
             "fails); choose another --out to keep both")
    if not found:
        return aside if aside.is_dir() else None
    if aside.is_dir():       # a killed run's aside folder holds the last finished outputs: keep those
        for name in found:
            _remove(out / name)
        return aside
    aside.mkdir()
    for name in found:
        os.replace(out / name, aside / name)
    return aside


def _describe(results_json: Path) -> str:
    """``method at sparsity S on DATASET`` of a finished run's results.json (``a finished run`` if unreadable)."""
    try:
        r = json.loads(results_json.read_text())
        return f"{r['method']} at sparsity {r['sparsity']['target']:g} on {r['dataset']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a finished run"


@contextlib.contextmanager
def replacing_outputs(out: str | os.PathLike | None, *, resumed: bool = False, own_results: bool = False):
    """The earlier outputs in ``out`` are set aside while the block runs, dropped when it finishes, and put
    back when it fails or is interrupted: a run never costs the outputs of the one before it. ``resumed``: a run
    continued from its checkpoints, whose own :data:`RESUMED_ENTRIES` stay where they are; if it stops again,
    the folder stays as a killed run leaves it (the earlier run's outputs aside, its own in place) for the next
    ``--resume``."""
    if not out:
        yield
        return
    aside = set_aside_outputs(Path(out), keep=RESUMED_ENTRIES if resumed else (), own_results=own_results)
    try:
        yield
    except BaseException:
        _stop_tracking_into(Path(out))
        if aside is not None and not resumed:
            restore_outputs(Path(out), aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def restore_outputs(out: Path, aside: Path) -> None:
    """Put an earlier run's outputs back into ``out`` after this run failed: each entry as a whole, this run's
    own partial one (files in ``rounds/``, a new event file in ``tensorboard/``) removed first, so that no
    folder holds some of each run."""
    if not aside.is_dir():
        return
    for name in OUTPUT_ENTRIES:
        _remove(out / name)
        if _present(aside / name):
            os.replace(aside / name, out / name)
    shutil.rmtree(aside, ignore_errors=True)


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()        # a dangling link is an entry too


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _present(path):
        path.unlink()


def _stop_tracking_into(out: Path) -> None:
    """Close the TensorBoard writer of the failed run when it writes into ``out``, before that run's events are
    removed: buffered events are never written again, into the earlier run's folder put back in their place."""
    from fairprune_jax.training import tracking
    tracker = tracking.current()
    if tracker is None:
        return
    try:
        tracker.logdir.resolve().relative_to(out.resolve())
    except ValueError:
        return                  # the caller's own tracker elsewhere: still theirs to use
    tracker.close()


def _check_outputs(cfg: RunConfig) -> None:
    """Settings that write into the output folder need one (``prepare`` alone writes nothing)."""
    if cfg.save_compact and not cfg.out:
        raise ValueError("--save-compact writes the compacted model into the output folder; set --out")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
