"""Checkpoint and resume a run with orbax, one phase (one ``train.fit`` call) at a time.

A run is a deterministic sequence of ``fit`` calls ("dense", "prune (gmp)",
"fine-tune (ceag)", ...). Each call is a *phase* with a stable key: its index
in the run and its description (``01-prune-gmp``). While a phase trains, its
whole state (the :class:`~fairprune_jax.training.train.TrainState`: params, masks,
optimizer state, model state, PRNG key, step, ``extra`` with multipliers and
replay buffers) and its position in the data (epoch, step in the epoch, global
step, the history so far) are saved every ``every`` steps, and once more when
the phase ends (its *final* checkpoint).

On resume the method code simply runs again: a phase with a final checkpoint
returns it without training; the phase that was cut short restores its state
and continues from the saved (epoch, step), with the same batch order (batches
depend only on ``(seed, epoch)``) and the same hook calls (hooks get the
global step). Everything between phases is deterministic, so the resumed run
ends where the uninterrupted one would have.

A phase whose ``fit`` hook keeps state on the host (e.g. votes collected by a
hook) cannot continue mid-way: such a hook is not marked ``resumable`` and
its phase is simply re-run from its start (see :func:`resumable`).

Layout of ``OUT/checkpoints/``::

    run.json                     config fingerprint; "complete" once the run finished
    00-dense/final/<step>/       orbax checkpoint: items "state" and "meta" (JSON)
    01-prune-gmp/final/<step>/
    02-fine-tune-ceag/partial/<step>/   the latest mid-phase checkpoint (kept: 1)

orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp-*`` and renames
it when complete (an atomic rename on local filesystems), so a run killed while
writing leaves at worst a temporary folder that is ignored and cleaned up.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.training import distributed

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"
#: Where a finished run's checkpoints wait while a new run replaces them (beside the checkpoint folder): put
#: back if the new run fails before it has a checkpoint of its own, dropped when it finishes.
PREVIOUS_DIR = ".previous-checkpoints"
FORMAT_VERSION = 1

#: RunConfig fields that do not change what a run computes (left out of the fingerprint).
NOT_FINGERPRINTED = ("out", "progress", "save_compact")

#: What a new Checkpointer does with its folder (process 0's choice is broadcast to every process).
_ACTIONS = ("fresh", "replace", "resume", "unfinished", "mismatch")

_ACTIVE: contextvars.ContextVar["Checkpointer | None"] = contextvars.ContextVar("fairprune_ckpt", default=None)


class CheckpointMismatchError(ValueError):
    """The checkpoints on disk belong to a different run (config, model or code)."""


def resumable(hook: Callable) -> Callable:
    """Mark a ``fit`` hook as a pure function of ``(state, step)``, so its phase may resume mid-way.

    Unmarked hooks are assumed to keep host state (their phase restarts from
    its beginning on resume, and is never skipped).
    """
    hook.resumable = True  # type: ignore[attr-defined]
    return hook


def fingerprint(config: Any) -> dict:
    """The JSON-able settings that determine a run's numbers (a ``RunConfig`` or a dict)."""
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    d = {k: v for k, v in d.items() if k not in NOT_FINGERPRINTED}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _slug(desc: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", desc.lower()).strip("-") or "phase"


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: only runs that checkpoint pay for it
    return ocp


def _manager(path: Path, *, read_only: bool = False):
    ocp = _ocp()
    opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only, read_only=read_only,
                                        enable_async_checkpointing=False,
                                        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(path, options=opts)


def _is_primary() -> bool:
    return jax.process_index() == 0


class Checkpointer:
    """The checkpoints of one run in ``directory``; hands out :class:`Phase` objects in call order."""
    resumed_complete = False     # set in __init__: resuming a run that had finished
    _replace_pending = False     # a finished run's checkpoints wait in place for this run's first save

    def __init__(self, directory: str | Path, config: Any, *, every: int = 200, resume: bool = False,
                 data: dict | None = None, after_s: float = 0.0, devices: int | None = None):
        if int(every) < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 (0 = off); got {every}")
        if after_s > 0 and jax.process_count() > 1:
            raise ValueError("checkpoints that start after a delay (after_s) need one process: each process's clock "
                             "would decide on its own, and their collective writes would wait for each other")
        self.directory = Path(directory).absolute()
        self.every = int(every)
        self.after_s = float(after_s)
        self._t0 = time.monotonic()
        self._started = False
        self.fingerprint = fingerprint(config)
        self.digest = _digest(self.fingerprint)
        self.data = data
        self.resumed = False
        self._count = 0
        run_file = self.directory / RUN_FILE
        # Every process reads what is on disk, then all follow process 0's decision (one broadcast, which is
        # also a barrier: nobody writes run.json before every process has read it), then process 0 writes.
        try:
            saved = json.loads(run_file.read_text()) if run_file.is_file() else None
            if saved is not None and not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            if resume:
                raise CheckpointMismatchError(
                    f"cannot resume: {run_file} cannot be read ({e}; a truncated or edited file). Start the run "
                    "afresh without --resume, or in another --out") from None
            saved = {}
        error: Exception | None = None
        if resume and saved is not None:
            action = "resume"
            try:
                self._check_same_run(saved)
            except CheckpointMismatchError as e:
                action, error = "mismatch", e
        elif saved is not None or self._phase_dirs():
            if (saved is not None and saved.get("complete")) or not self._phase_dirs():
                action = "replace"        # a finished run (or one that failed before saving) is rerun from scratch
            else:
                action = "unfinished"
                error = ValueError(f"{self.directory} holds checkpoints of an unfinished run; pass --resume to "
                                   "continue it, or delete that folder (or choose another --out) to start over")
        else:
            action = "fresh"
        decided = _ACTIONS[distributed.agree(_ACTIONS.index(action))]
        if decided != action:
            raise ValueError(f"process {jax.process_index()} sees other checkpoints in {self.directory} than "
                             f"process 0 ({action!r} here, {decided!r} there): every process must see the same "
                             "--out folder (a filesystem they all share)")
        if error is not None:
            raise error
        self.resumed = action == "resume"
        # the device count of every start of this run (a resume may use another count: results.json says so)
        here = int(devices) if devices is not None else distributed.num_devices(distributed.current_mesh())
        earlier = (saved or {}).get("devices") if self.resumed else None
        self.devices = [*(earlier if isinstance(earlier, list) else [None]), here] if self.resumed else [here]
        # resuming a run that had finished (to add --save-compact): the results.json in its folder is its own
        self.resumed_complete = self.resumed and bool((saved or {}).get("complete"))
        if resume and action == "fresh" and _is_primary():
            warn(f"--resume: {self.directory} holds no checkpoints of a run, so this run starts from the beginning "
                 "(runs write them with --checkpoint-every N, and by default once they have lasted a minute)")
        self.previous = self.directory.parent / PREVIOUS_DIR
        # a finished run's checkpoints are set aside when this run writes its first one (restore_previous puts
        # them back if it fails): a delayed Checkpointer killed before that leaves them where --resume finds them
        self._replace_pending = not self.resumed and _is_primary() and action == "replace"
        if self._replace_pending and self.after_s <= 0:
            self._set_previous_aside()
        if self.resumed or self.after_s <= 0:
            self._start()
        distributed.barrier("checkpoint-start")

    def _set_previous_aside(self) -> None:
        """Move the finished run's checkpoints this run replaces to :data:`PREVIOUS_DIR`."""
        if self._replace_pending:
            if self.previous.exists():
                shutil.rmtree(self.previous)
            if self.directory.exists():
                self.directory.replace(self.previous)
            self._replace_pending = False

    def _start(self) -> None:
        """Create the folder and its ``run.json`` (at the first save of a delayed Checkpointer)."""
        self._set_previous_aside()
        if not self._started and not self.resumed and _is_primary():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_run_file(complete=False)
        self._started = True

    @property
    def started(self) -> bool:
        """Whether this run has written (or resumed) checkpoints in its folder."""
        return self._started

    def skip_phase(self) -> None:
        """Count a phase that does not train here (a dense model read from the cache), so the later phases keep
        their numbers whether or not it trained."""
        self._count += 1

    def active(self) -> bool:
        """Whether saves happen now: always with ``after_s`` 0, else once the run has lasted ``after_s`` seconds
        (a shorter run loses little when killed, and writes nothing)."""
        if self.every <= 0:
            return False
        if not self._started and time.monotonic() - self._t0 >= self.after_s:
            self._start()
        return self._started

    def _phase_dirs(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("[0-9][0-9]-*") if p.is_dir()) if self.directory.is_dir() else []

    def _write_run_file(self, complete: bool) -> None:
        tmp = self.directory / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "fingerprint": self.digest, "complete": complete,
                                   "config": self.fingerprint, "data": self.data,
                                   "devices": getattr(self, "devices", None)}, indent=1, sort_keys=True))
        tmp.replace(self.directory / RUN_FILE)

    def _check_same_run(self, saved: dict) -> None:
        if saved.get("format") != FORMAT_VERSION:
            raise CheckpointMismatchError(f"{self.directory}: checkpoint format {saved.get('format')} is not "
                                          f"{FORMAT_VERSION}; start a new run (another --out)")
        if saved.get("fingerprint") == self.digest:
            old = saved.get("data")
            if old is not None and self.data is not None and old != self.data:
                what = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {self.data.get(k)!r}"
                                 for k in sorted(set(old) | set(self.data)) if old.get(k) != self.data.get(k))
                raise CheckpointMismatchError(
                    f"cannot resume: the data changed since the checkpoints in {self.directory} were written "
                    f"({what}); resuming would continue the old run on other rows. Start the run afresh (without "
                    "--resume) or in another --out")
            return
        old = saved.get("config", {})
        keys = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
        diffs = "; ".join(f"{k}: checkpoint {old.get(k)!r} vs now {self.fingerprint.get(k)!r}" for k in keys)
        raise CheckpointMismatchError(
            f"cannot resume: the checkpoints in {self.directory} are of a different run ({diffs}). Resume with "
            "the original settings, or start a new run in another --out")

    def phase(self, desc: str, *, resumable: bool = True) -> "Phase | None":
        """The next phase (``None`` when it must not be checkpointed: its hook keeps host state)."""
        key = f"{self._count:02d}-{_slug(desc)}"
        self._count += 1
        if self.resumed:
            other = [p.name for p in self.directory.glob(f"{key[:2]}-*") if p.name != key]
            if other:
                raise CheckpointMismatchError(
                    f"cannot resume: {self.directory / other[0]} is of another phase than this run's phase "
                    f"{key[:2]} {desc!r} (did the method code change?); start a new run in another --out")
        if not resumable:
            if _is_primary() and (self.directory / key).exists():
                shutil.rmtree(self.directory / key)
            return None
        return Phase(self, key, desc)

    def mark_complete(self) -> None:
        """Record that the run finished (a later run without ``--resume`` may then overwrite it); the checkpoints
        of the run it replaced go."""
        if _is_primary() and self.previous.exists():
            shutil.rmtree(self.previous, ignore_errors=True)
        if not self._started:       # a delayed Checkpointer whose run ended before its first save: the finished
            if self._replace_pending and self.directory.exists():     # run's checkpoints it replaced go too
                shutil.rmtree(self.directory, ignore_errors=True)
            self._replace_pending = False
            return
        if _is_primary():
            self._write_run_file(complete=True)
        distributed.barrier("checkpoint-complete")

    def restore_previous(self) -> None:
        """After this run failed: the finished run it was replacing gets its checkpoints back, unless this run has
        checkpoints of its own to ``--resume`` from (then they stay, and the earlier ones wait beside them)."""
        if not _is_primary() or not self.previous.is_dir() or self._phase_dirs():
            return
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.previous.replace(self.directory)


def _position(meta: dict) -> dict:
    return {k: meta[k] for k in ("epoch", "step_in_epoch", "global_step", "final", "history", "epoch_stats")}


class Phase:
    """The checkpoints of one ``fit`` call: ``final/`` once it ended, ``partial/`` while it runs."""

    def __init__(self, owner: Checkpointer, key: str, desc: str):
        self.owner, self.key, self.desc = owner, key, desc
        self.dir = owner.directory / key
        self.every = owner.every
        self._partial = None

    def due(self, global_step: int) -> bool:
        return self.every > 0 and global_step % self.every == 0 and self.owner.active()

    def restore(self, state: Any) -> tuple[Any, dict] | None:
        """The saved state (shaped, typed and placed like ``state``) and position, or ``None``."""
        if not self.owner.resumed:
            return None
        for sub in ("final", "partial"):
            path = self.dir / sub
            if not path.is_dir():
                continue
            mngr = _manager(path)   # also removes temporary folders left by a crash mid-write
            try:
                step = mngr.latest_step()
                if step is None:
                    continue
                return self._restore(mngr, step, state, path)
            finally:
                mngr.close()
        return None

    def _restore(self, mngr, step: int, state: Any, path: Path) -> tuple[Any, dict]:
        ocp = _ocp()
        fresh = ("start the run afresh without --resume (the results already in the output folder stay there "
                 "until the new run has its own), or in another --out")
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if not isinstance(meta, dict):
                raise ValueError("its metadata is not a JSON object")
        except Exception as e:  # noqa: BLE001 - an empty or truncated metadata file: name it, not orbax internals
            raise CheckpointMismatchError(
                f"cannot resume: checkpoint {path / str(step)} cannot be read (corrupt or truncated: "
                f"{type(e).__name__}: {str(e)[:200]}); {fresh}") from None
        if meta.get("desc") != self.desc or meta.get("fingerprint") != self.owner.digest:
            raise CheckpointMismatchError(
                f"cannot resume: checkpoint {path / str(step)} is of phase {meta.get('desc')!r} "
                f"(fingerprint {meta.get('fingerprint')}), but this run's phase {self.key} is {self.desc!r} "
                f"(fingerprint {self.owner.digest}); start a new run in another --out")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # structure / shape / dtype mismatch: name the checkpoint, not orbax internals
            raise CheckpointMismatchError(
                f"cannot resume: checkpoint {path / str(step)} cannot be read as the state of phase {self.desc!r} "
                f"(a truncated or corrupt file, or a different model or method): {type(e).__name__}: "
                f"{str(e)[:300]}; {fresh}") from e
        return restored, _position(meta)

    def save(self, state: Any, *, epoch: int, step_in_epoch: int, global_step: int, history: dict,
             epoch_stats: list[dict], final: bool) -> None:
        """Write a checkpoint (synchronously: the next train step donates ``state``); nothing before a delayed
        Checkpointer is active."""
        if not self.owner.active():
            return
        ocp = _ocp()
        meta = {"desc": self.desc, "fingerprint": self.owner.digest, "epoch": int(epoch),
                "step_in_epoch": int(step_in_epoch), "global_step": int(global_step), "final": bool(final),
                "history": {k: [float(v) for v in history.get(k, [])] for k in ("loss", "accuracy")},
                "epoch_stats": {k: [float(s[k]) for s in epoch_stats] for k in ("loss", "accuracy")}}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if final:
            self.close()
            with contextlib.closing(_manager(self.dir / "final")) as mngr:
                mngr.save(global_step, args=args, force=True)
                mngr.wait_until_finished()
            if _is_primary():
                shutil.rmtree(self.dir / "partial", ignore_errors=True)
            return
        if self._partial is None:
            self._partial = _manager(self.dir / "partial")
        if global_step in (self._partial.all_steps() or []):
            return
        self._partial.save(global_step, args=args, force=True)
        self._partial.wait_until_finished()

    def close(self) -> None:
        if self._partial is not None:
            self._partial.close()
            self._partial = None


@contextlib.contextmanager
def use(checkpointer: Checkpointer | None) -> Iterator[Checkpointer | None]:
    """Within the block, every ``train.fit`` call is a checkpointed phase of ``checkpointer``."""
    token = _ACTIVE.set(checkpointer)
    try:
        yield checkpointer
    finally:
        _ACTIVE.reset(token)


def current() -> Checkpointer | None:
    return _ACTIVE.get()


def describe(directory: str | Path) -> str | None:
    """What the checkpoints in ``directory`` hold, in a few words (None when there are none).

    ``"00-dense finished, 01-prune-gmp at step 40"``: read from the folder names only (cheap, no orbax).
    """
    directory = Path(directory)
    parts = []
    for ph in sorted(p for p in directory.glob("[0-9][0-9]-*") if p.is_dir()):
        final = [p for p in (ph / "final").glob("*") if p.name.isdigit()] if (ph / "final").is_dir() else []
        partial = sorted(int(p.name) for p in (ph / "partial").glob("*") if p.name.isdigit()) \
            if (ph / "partial").is_dir() else []
        if final:
            parts.append(f"{ph.name} finished")
        elif partial:
            parts.append(f"{ph.name} at step {partial[-1]}")
    return ", ".join(parts) or None


def read_final(out: str | Path, phase: str | None = None) -> dict:
    """The final state of a phase of a finished run, as nested numpy (default: the last phase).

    For inspection and tests (e.g. compare the masks of two runs); PRNG keys
    come back as their raw key data, and ``state["masks"]`` is the masks read from the optimizer state.
    """
    ocp = _ocp()
    out = Path(out).absolute()   # orbax wants absolute paths
    root = out / CHECKPOINT_DIR if (out / CHECKPOINT_DIR).is_dir() else out
    phases = sorted(p.name for p in root.glob("[0-9][0-9]-*") if (p / "final").is_dir())
    if not phases:
        raise FileNotFoundError(f"no finished phase checkpoints under {root}")
    name = phases[-1] if phase is None else next((p for p in phases if p == phase or p[3:] == _slug(phase)), None)
    if name is None:
        raise FileNotFoundError(f"no final checkpoint of phase {phase!r} under {root}; phases: {', '.join(phases)}")
    with contextlib.closing(_manager(root / name / "final", read_only=True)) as mngr:
        step = mngr.latest_step()
        # onto this process's first device, whatever devices saved it (e.g. two processes, read by one)
        tree = ocp.StandardCheckpointer().metadata(root / name / "final" / str(step) / "state").item_metadata.tree
        here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), tree)
        out_tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                              meta=ocp.args.JsonRestore()))
    def to_np(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    state = jax.tree.map(to_np, out_tree["state"])
    if isinstance(state, dict) and "masks" not in state:       # the masks live in the optimizer state
        state["masks"] = _saved_masks(state.get("opt_state"))
    return {"phase": name, "state": state, "meta": out_tree["meta"]}


def _saved_masks(opt_state: Any) -> Any:
    """The masks of a saved optimizer state (its :class:`pruning.MaskState` / ``PrunerState``, read back as
    a dict with a ``masks`` entry beside the inner state), or None."""
    if isinstance(opt_state, dict):
        if "masks" in opt_state and ("inner" in opt_state):
            return opt_state["masks"]
        for v in opt_state.values():
            found = _saved_masks(v)
            if found is not None:
                return found
    if isinstance(opt_state, (list, tuple)):
        for v in opt_state:
            found = _saved_masks(v)
            if found is not None:
                return found
    return None
