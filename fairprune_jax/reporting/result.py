"""A run's result as a typed object: :class:`Report`.

``fairprune_jax.prune`` and ``runner.run`` return a :class:`Report`. It *is* the dict that ``results.json``
holds (``report["pruned"]["test"]["groups"]["F"]["accuracy"]`` keeps working), with attributes for the
headline numbers and :meth:`Report.by_group`, one row per group, the way fairlearn's ``MetricFrame.by_group``
reads: a pandas DataFrame when pandas is installed, else a list of dicts.

``results.json`` schema (``schema_version`` 2): group and split sizes (``n``, ``positives``, ``negatives``,
``lost``, ``gained``) are integers; every per-group figure is a float or ``null`` (a group without rows in a
split); ``pruned.<split>.certificate`` holds the certificate (``certify.certificate``) for the test and, when
there is one, the validation split. Every field, with its type and meaning: ``docs/RESULTS.md``
(``tests/test_results_schema.py`` fails when a run writes a field it does not list).
"""
from __future__ import annotations

from typing import Any

#: Version of the results.json layout described above (1: group sizes written as floats).
SCHEMA_VERSION = 2

#: The columns of :meth:`Report.by_group`, in order.
BY_GROUP_COLUMNS = ("group", "n", "positives", "negatives", "dense_accuracy", "accuracy", "accuracy_low",
                    "accuracy_high", "psi", "psi_low", "psi_high", "psi_upper", "verdict", "lost", "gained", "flip_rate",
                    "floor", "selection_rate", "tpr", "fpr")


class Report(dict):
    """The results of one run (the ``results.json`` dict) with typed attributes and :meth:`by_group`.

    Built from an older ``results.json`` (``Report(json.load(f))`` or :meth:`load`), a version-2 certificate
    is rebuilt as version 3 (:func:`upgrade_certificates`: the headline bound every table shows); a version-1
    certificate, whose intervals under-covered small groups, keeps no interval or verdict in :meth:`by_group`
    and :attr:`certified_max_psi` is None, with a warning: rerun such a run.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "pruned" not in self and {"rows", "aggregate"} <= set(self):
            raise ValueError("this is a grid's results.json (fairprune compare), not a run's: read its rows, or "
                             "load a cell's results.json (cells/<method>_s<sparsity>_seed<seed>/results.json)")
        if isinstance(self.get("pruned"), dict):
            upgrade_certificates(self)
            if self.certificate_version == 1:
                from fairprune_jax.core.notices import warn
                warn("this results.json holds a version-1 certificate, whose intervals under-covered small "
                     "groups: its intervals, verdicts and certified bound are not shown; rerun the run for a "
                     "certificate that keeps its level")

    @classmethod
    def load(cls, path) -> "Report":
        """The report of a finished run: its folder or its ``results.json``."""
        import json
        from pathlib import Path
        p = Path(path)
        p = p / "results.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist: pass a run's --out folder or its results.json")
        return cls(json.loads(p.read_text()))

    def __repr__(self) -> str:
        """One line (the whole dict is ``dict(report)``)."""
        try:
            parts = [f"method={self.get('method')!r}", f"dataset={self.get('dataset')!r}",
                     f"sparsity={self.sparsity:.4f}", f"accuracy={self.accuracy:.4f}",
                     f"dense_accuracy={self.dense_accuracy:.4f}"]
            if self.certified_max_psi is not None:
                parts.append(f"certified_max_psi={self.certified_max_psi:.4f}")
            parts.append(f"groups={len(self.groups)}")
            if self.degenerate:
                parts.append("DEGENERATE")
            return f"Report({', '.join(parts)}; by_group() for the per-group table)"
        except (KeyError, TypeError, ValueError):
            return f"Report({dict.__repr__(self)})"

    @property
    def schema_version(self) -> int:
        """The results.json layout version (1 when the file predates the field)."""
        return int(self.get("schema_version", 1))

    @property
    def certificate_version(self) -> int | None:
        """The test certificate's interval version (``certify.INTERVAL_VERSION``), None without one."""
        c = self.certificate
        return None if c is None else int(c.get("interval_version", 1))

    @property
    def degenerate(self) -> bool | None:
        """Whether the pruned model predicts one class for nearly every test row (None: not recorded)."""
        d = self["pruned"]["test"].get("degenerate")
        return None if d is None else bool(d)

    @property
    def warnings(self) -> list[str]:
        """What the run warned about in its method's record (an unmet constraint, a fallback, ...)."""
        return [w for w in (self.get("method_info") or {}).get("warnings", []) if isinstance(w, str)]

    @property
    def accuracy(self) -> float:
        """The pruned model's test accuracy."""
        return float(self["pruned"]["test"]["accuracy"])

    @property
    def dense_accuracy(self) -> float:
        """The dense model's test accuracy."""
        return float(self["dense"]["test"]["accuracy"])

    @property
    def sparsity(self) -> float:
        """The achieved sparsity of the prunable weights."""
        return float(self["sparsity"]["achieved"])

    @property
    def certificate(self) -> dict | None:
        """The test split's certificate (see ``certify.certificate``), or None."""
        return self["pruned"]["test"].get("certificate")

    @property
    def certified_max_psi(self) -> float | None:
        """With the certificate's confidence, no group lost more than this beyond the overall loss."""
        c = self.certificate
        return None if c is None or c.get("certified_max_psi") is None else float(c["certified_max_psi"])

    @property
    def floor_max_psi(self) -> float | None:
        """The certified bound a pruned model identical to the dense one would get on these test rows."""
        c = self.certificate
        return None if c is None or c.get("floor_max_psi") is None else float(c["floor_max_psi"])

    @property
    def max_psi(self) -> float | None:
        """The largest excess accuracy gap psi_g on the test split (a point estimate)."""
        gap = self["pruned"]["test"].get("excess_accuracy_gap") or {}
        return None if gap.get("max") is None else float(gap["max"])

    @property
    def groups(self) -> list[str]:
        """The group names, in id order."""
        return list(self["groups"]["names"])

    def by_group(self, split: str = "test", *, frame: bool | None = None):
        """One row per group of ``split`` (columns :data:`BY_GROUP_COLUMNS`): sizes, dense and pruned accuracy
        with its confidence interval, psi_g with its interval and verdict, flips, floor, selection rate, TPR,
        FPR. Intervals and verdicts come from the split's certificate (test, and val when the run had one;
        ``None`` on train). ``frame``: a pandas DataFrame (default: when pandas is installed), else a list of
        dicts."""
        if split not in self["pruned"]:
            raise ValueError(f"no split {split!r} in this report; splits: {', '.join(self['pruned'])}")
        pruned, dense = self["pruned"][split], self["dense"].get(split, {})
        cert_all = pruned.get("certificate") or {}
        cert = cert_all.get("groups", {}) if int(cert_all.get("interval_version", 1)) >= 2 else {}
        psi = ((pruned.get("excess_accuracy_gap") or {}).get("per_group") or {})
        rows = []
        for name, g in pruned["groups"].items():
            c = cert.get(name) or {k: v for k, v in (cert_all.get("groups") or {}).get(name, {}).items()
                                   if k in ("n", "lost", "gained", "positives", "negatives")}   # version 1: counts only
            d = (dense.get("groups") or {}).get(name, {})
            rows.append({
                "group": name, "n": _int(g.get("n")), "positives": _int(c.get("positives")),
                "negatives": _int(c.get("negatives")), "dense_accuracy": d.get("accuracy"),
                "accuracy": g.get("accuracy"), "accuracy_low": c.get("accuracy_low"),
                "accuracy_high": c.get("accuracy_high"), "psi": psi.get(name, c.get("psi")),
                "psi_low": c.get("low"), "psi_high": c.get("high"), "psi_upper": c.get("upper"),
                "verdict": c.get("verdict"),
                "lost": _int(c.get("lost")), "gained": _int(c.get("gained")), "flip_rate": c.get("flip_rate"),
                "floor": c.get("floor"), "selection_rate": g.get("selection_rate"), "tpr": g.get("tpr"),
                "fpr": g.get("fpr")})
        if frame is None:
            frame = _has_pandas()
        if frame:
            import pandas as pd
            df = pd.DataFrame(rows, columns=list(BY_GROUP_COLUMNS)).set_index("group")
            for c in ("n", "positives", "negatives", "lost", "gained"):   # counts stay integers beside a missing one
                df[c] = df[c].astype("Int64")
            return df
        return rows


def upgrade_certificates(results: dict) -> int:
    """Rebuild every version-2 certificate of a run's results in place as version 3 (``certify.upgrade``:
    the certified max psi_g and floor from the counts the certificate stores; intervals and verdicts are
    unchanged) and return how many were rebuilt, so that tables never mix the two headline bounds."""
    from fairprune_jax.metrics import certify
    done = 0
    for rep in (results.get("pruned") or {}).values():
        cert = rep.get("certificate") if isinstance(rep, dict) else None
        if cert and cert.get("interval_version") == 2:
            new = certify.upgrade(cert)
            done += new is not cert
            rep["certificate"] = new
    return done


def _int(v: Any) -> int | None:
    return None if v is None else int(round(float(v)))


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True
