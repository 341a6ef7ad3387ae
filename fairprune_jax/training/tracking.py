"""Experiment tracking: TensorBoard event files and a summary of the same series for ``results.json``.

What is logged: every training phase that runs through :func:`train.fit` (dense training, gradual pruning,
fine-tuning, ...) writes its per-step statistics under ``<phase>/``: ``loss``, ``accuracy`` and whatever
else the step returns. Constrained steps (``ceag``, ``el``) also return one value per group: the
Lagrange ``multipliers``, the ``violation`` the dual step read (psi_g - eps for CEAG; NaN while a group is
unobserved) and ``group_accuracy`` (the replay-buffer or held-out accuracy the dual step used; the batch
accuracy otherwise). These are logged per group (``ceag_finetune/multipliers/digit 3``) up to
``max_group_series`` groups, and always as ``.../max``, ``.../mean`` and a histogram over groups.

No host round-trip inside a step: :func:`train.fit` keeps each step's (device) statistics and hands them
over every ``log_every`` steps, when it already reads the loss back for its progress bar.

Writer: ``tensorboardX`` (pure Python, only ``protobuf`` and ``numpy`` besides; no TensorFlow or PyTorch),
maintained and API-compatible with ``torch.utils.tensorboard``. Install with ``pip install tensorboardX``
(or the ``[tracking]`` extra). The files are standard TFRecord event files that ``tensorboard --logdir``
reads; :func:`read_scalars` reads them back without TensorFlow (tests use it).

Use: ``fairprune run --tensorboard`` (events in ``OUT/tensorboard``), ``tensorboard = true`` in a compare
TOML (events next to each cell's ``results.json`` and in ``OUT/dense/seedN/tensorboard``), or in Python::

    with tracking.use(tracking.TensorBoard("runs/x/tensorboard")) as tb:
        results = runner.run(cfg)
"""
from __future__ import annotations

import contextlib
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import numpy as np

_CURRENT: list["TensorBoard | None"] = [None]

#: per-group series are written individually up to this many groups (always as max / mean / histogram)
MAX_GROUP_SERIES = 32
EVENT_GLOB = "events.out.tfevents.*"


def current() -> "TensorBoard | None":
    """The tracker installed by :func:`use`, or None (tracking off)."""
    return _CURRENT[-1]


@contextlib.contextmanager
def use(tracker: "TensorBoard | None") -> Iterator["TensorBoard | None"]:
    """Install ``tracker`` for the ``fit`` calls inside the block (None: tracking off); closes it at the end."""
    _CURRENT.append(tracker)
    try:
        yield tracker
    finally:
        _CURRENT.pop()
        if tracker is not None:
            tracker.close()


def phase_name(desc: str) -> str:
    """A tag prefix from a ``fit`` description: ``"fine-tune (ceag)"`` -> ``"fine-tune_ceag"``."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.\-]+", "_", desc)).strip("_") or "train"


class TensorBoard:
    """Writes per-step statistics of every ``fit`` phase into ``logdir`` and keeps a summary of them.

    ``logdir`` is owned by the tracker: event files an earlier run left there are removed, so the folder
    shows one run. Nothing is made or removed until the first phase starts (or :meth:`flush`), not when the
    tracker is made: by then the run has checked and locked its output folder and set an earlier run's outputs
    aside, so a run refused there or failing before it trains leaves the earlier events alone.
    ``group_names`` (set by the runner once the data is loaded) name the per-group series.
    """

    def __init__(self, logdir: str | Path, group_names: list[str] | None = None,
                 max_group_series: int = MAX_GROUP_SERIES, flush_secs: int = 10):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("TensorBoard logging needs tensorboardX (pure Python, no TensorFlow): "
                              "pip install tensorboardX   (or: pip install 'fairprune_jax[tracking]')") from None
        del SummaryWriter       # imported here only to fail at once, before the run, when it is missing
        self.logdir = Path(logdir)
        self.flush_secs = int(flush_secs)
        self.writer: Any = None         # made by _open, when the first phase starts
        self.group_names = list(group_names) if group_names is not None else None
        self.max_group_series = int(max_group_series)
        self._phases: dict[str, dict] = {}
        self._closed = False

    def _open(self) -> Any:
        """The event writer, made on first use: the folder, an earlier run's event files removed, a new one."""
        if self.writer is None:
            from tensorboardX import SummaryWriter
            self.logdir.mkdir(parents=True, exist_ok=True)
            for old in self.logdir.glob(EVENT_GLOB):
                old.unlink()
            self.writer = SummaryWriter(logdir=str(self.logdir), flush_secs=self.flush_secs)
        return self.writer

    # -- phases and values ---------------------------------------------------------------------------
    def phase(self, desc: str) -> str:
        """A new phase's unique tag prefix (a second ``fit`` with the same description gets ``_2``, ...)."""
        self._open()
        base = phase_name(desc)
        name, k = base, 1
        while name in self._phases:
            k += 1
            name = f"{base}_{k}"
        self._phases[name] = {"steps": 0, "scalars": {}, "per_group": {}}
        return name

    def _names(self, k: int) -> list[str]:
        if self.group_names is not None and len(self.group_names) == k:
            return [str(g) for g in self.group_names]
        return [str(i) for i in range(k)]

    def log(self, phase: str, steps: list[int], stats: list[dict[str, Any]]) -> None:
        """Write host statistics of ``steps`` (one dict of numbers / 1-D arrays per step) under ``phase``."""
        rec = self._phases[phase]
        w = self._open()
        for step, st in zip(steps, stats):
            rec["steps"] = max(rec["steps"], int(step))
            for key, value in st.items():
                v = np.asarray(value, dtype=np.float64)
                if v.ndim == 0:
                    if np.isfinite(v):
                        w.add_scalar(f"{phase}/{key}", float(v), int(step))
                    _update(rec["scalars"], key, float(v))
                elif v.ndim == 1:
                    self._log_vector(phase, rec, key, v, int(step))

    def _log_vector(self, phase: str, rec: dict, key: str, v: np.ndarray, step: int) -> None:
        w = self.writer
        names = self._names(v.shape[0])
        finite = np.isfinite(v)
        if v.shape[0] <= self.max_group_series:
            for name, x, ok in zip(names, v, finite):
                if ok:
                    w.add_scalar(f"{phase}/{key}/{name}", float(x), step)
        if finite.any():
            w.add_scalar(f"{phase}/{key}/max", float(np.max(v[finite])), step)
            w.add_scalar(f"{phase}/{key}/mean", float(np.mean(v[finite])), step)
            if finite.sum() > 1:
                w.add_histogram(f"{phase}/{key}/over_groups", v[finite], step)
        pg = rec["per_group"].setdefault(key, {"groups": names, "first": [None] * len(names),
                                               "last": [None] * len(names), "max": [None] * len(names),
                                               "min": [None] * len(names)})
        for i, (x, ok) in enumerate(zip(v, finite)):
            if not ok:
                continue
            x = float(x)
            if pg["first"][i] is None:
                pg["first"][i] = x
            pg["last"][i] = x
            pg["max"][i] = x if pg["max"][i] is None else max(pg["max"][i], x)
            pg["min"][i] = x if pg["min"][i] is None else min(pg["min"][i], x)

    # -- output --------------------------------------------------------------------------------------
    def summary(self, relative_to: str | Path | None = None) -> dict:
        """What ``results.json`` records under ``tracking``: per phase, first / last / min / max of every
        scalar series and, per group, of every per-group series (rounded); the event folder."""
        where = self.logdir
        if relative_to is not None:
            try:
                where = self.logdir.resolve().relative_to(Path(relative_to).resolve())
            except ValueError:
                pass
        r6 = lambda x: None if x is None else round(float(x), 6)  # noqa: E731
        phases = {}
        for name, rec in self._phases.items():
            phases[name] = {
                "steps": rec["steps"],
                "scalars": {k: {s: r6(v[s]) for s in ("first", "last", "min", "max")} for k, v in rec["scalars"].items()},
                "per_group": {k: {"groups": v["groups"], **{s: [r6(x) for x in v[s]]
                                                            for s in ("first", "last", "min", "max")}}
                              for k, v in rec["per_group"].items()}}
        return {"format": "tensorboard", "logdir": str(where), "phases": phases}

    def flush(self) -> None:
        if not self._closed:
            self._open().flush()        # a run that trained no phase still leaves its (empty) event file

    def close(self) -> None:
        if not self._closed:
            if self.writer is not None:
                self.writer.close()
            self._closed = True


def _update(d: dict, key: str, v: float) -> None:
    if not np.isfinite(v):
        return
    s = d.setdefault(key, {"first": v, "last": v, "min": v, "max": v})
    s["last"] = v
    s["min"], s["max"] = min(s["min"], v), max(s["max"], v)


# -- reading (tests, notebooks): no TensorFlow needed --------------------------------------------------

def read_events(path: str | Path) -> Iterator[Any]:
    """The ``Event`` protos of one event file, checking each record's length and data CRCs; a partial last
    record (the file of a run still writing it) ends the iteration instead of failing."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(data: bytes) -> int:
        x = crc32c(data) & 0xFFFFFFFF
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    raw = Path(path).read_bytes()
    pos = 0
    while pos < len(raw):
        if pos + 12 > len(raw):
            return                      # a record still being written (a run in progress): stop before it
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
        if masked(header) != hcrc:
            raise ValueError(f"{path}: corrupt record header at byte {pos}")
        if pos + 16 + length > len(raw):
            return
        data = raw[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
        if masked(data) != dcrc:
            raise ValueError(f"{path}: corrupt record data at byte {pos}")
        pos += 16 + length
        ev = event_pb2.Event()
        ev.ParseFromString(data)
        yield ev


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``logdir`` (recursively)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(logdir).rglob(EVENT_GLOB)):
        for ev in read_events(f):
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out
