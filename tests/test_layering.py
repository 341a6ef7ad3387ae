"""The layers of the package and the import rule of ``methods/``.

Sub-packages are layers (docs/ARCHITECTURE.md has the picture): a module imports only from its own sub-package
and the ones :data:`LAYERS` lists below it, so nothing low (sparsity, constraints, metrics, training, ...)
imports ``methods`` or ``running``. Within ``methods/`` a method file imports ``methods/base.py`` and modules
below it, never another method file, so one method can be read, changed or removed without the others; shared
machinery (the gradual-pruning start, rewinding, Ballot's votes, the fairness objective) lives one floor below,
in ``techniques/``. Parsed with ``ast``: nothing is imported, so this is fast and sees imports inside functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import fairprune_jax

METHODS_DIR = Path(fairprune_jax.__file__).parent / "methods"
PACKAGE = "fairprune_jax.methods"


def method_imports(source: str) -> list[str]:
    """The modules of ``methods/`` other than ``base`` that ``source`` (a file in ``methods/``) imports,
    anywhere in the file (top level, inside functions, relative or absolute)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: resolve against fairprune_jax.methods
                base = PACKAGE.split(".")[:len(PACKAGE.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from fairprune_jax.methods import x``: x is a submodule or a name from methods/__init__.py, which
            # imports every method; both count unless x is base
            names = [f"{mod}.{a.name}" for a in node.names] if mod == PACKAGE else [mod]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                if name.split(".")[2:3] != ["base"]:
                    bad.append(name)
    return bad


def test_no_method_file_imports_another():
    files = sorted(p for p in METHODS_DIR.glob("*.py") if p.name != "__init__.py")   # __init__ is the registry
    assert len(files) >= 5, files
    found = {p.name: method_imports(p.read_text()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}, (
        "a file in methods/ imports another method file; move what they share one floor down "
        "(into fairprune_jax/techniques/, like gradual.py, rewind.py, voting.py)")


def test_the_check_sees_every_spelling():
    """The checker itself: each of these would be a cross-method import, ``base`` and lower modules are fine."""
    for src in ("from fairprune_jax.methods.ceag import make_dual",
                "import fairprune_jax.methods.lth",
                "from fairprune_jax.methods import ballot",
                "from fairprune_jax.methods import METHODS",
                "from . import gradual",
                "from .ceag import nft",
                "def f():\n    from fairprune_jax.methods.bifp import kept_units\n"):
        assert method_imports(src), src
    for src in ("from fairprune_jax.methods.base import Context",
                "from . import base", "from .base import register",
                "from fairprune_jax.methods import base",
                "from fairprune_jax.techniques.gradual import pruned_start",
                "from fairprune_jax import rewind, constrained"):
        assert method_imports(src) == [], src


def test_no_method_file_reads_the_output_folder():
    """A method writes to disk only through ``Context.save_masks`` (the run decides where): no method file but
    base.py reads ``config.out``."""
    import re
    files = sorted(p for p in METHODS_DIR.glob("*.py") if p.name not in ("__init__.py", "base.py"))
    found = [p.name for p in files if re.search(r"\b(cfg|config)\.out\b", p.read_text())]
    assert found == [], f"{found} read the output folder; save through ctx.save_masks instead"


def test_no_method_file_rereads_its_options():
    """A method receives its parsed options (``run(ctx, dense, opts)``): no method file reads the raw
    ``config.method_options`` or looks a method up in the registry to parse them again."""
    import re
    files = sorted(p for p in METHODS_DIR.glob("*.py") if p.name not in ("__init__.py", "base.py"))
    found = [p.name for p in files if re.search(r"\bmethod_options\b|\bMETHODS\b|\bget_method\b", p.read_text())]
    assert found == [], f"{found} re-read their options; take the parsed ``opts`` argument instead"


def test_every_random_draw_of_a_method_goes_through_a_named_stream():
    """Random numbers come from ``ctx.stream_seed(name)`` / ``ctx.stream_rng(name)`` (every stream listed in one
    place, ``methods/base.py``): no method file, nor the shared machinery they use, reads the run's seed or
    derives a seed of its own."""
    import re
    pkg = Path(fairprune_jax.__file__).parent
    files = [p for p in METHODS_DIR.glob("*.py") if p.name not in ("__init__.py", "base.py")]
    files += sorted((pkg / "techniques").glob("*.py"))
    pattern = r"\b(cfg|config)\.seed\b|\bderived_seed\(|default_rng\(\s*\["
    found = sorted(p.name for p in files if re.search(pattern, re.sub(r'""".*?"""', "", p.read_text(), flags=re.S)))
    assert found == [], f"{found} read the run's seed directly; add a named stream to methods/base.py"


# ---------------------------------------------------------------------------
# Layers: which sub-package may import which
# ---------------------------------------------------------------------------

PACKAGE_DIR = Path(fairprune_jax.__file__).parent

_BELOW_TRAINING = {"core", "data", "models", "sparsity", "metrics", "constraints"}
#: sub-package -> the sub-packages its modules may import (besides their own); lowest first
LAYERS = {
    "core": set(),
    "metrics": {"core"},
    "constraints": {"core"},
    "data": {"core"},
    "models": {"core"},
    "sparsity": {"core", "models"},
    "training": _BELOW_TRAINING,
    "techniques": _BELOW_TRAINING | {"training"},
    "methods": _BELOW_TRAINING | {"training", "techniques"},
    "reporting": {"core", "metrics"},
    "running": _BELOW_TRAINING | {"training", "techniques", "methods", "reporting"},
}


def imported_packages(source: str, own: str) -> set[str]:
    """The fairprune_jax sub-packages ``source`` (a module of sub-package ``own``) imports at run time, anywhere
    in the file; imports under ``if TYPE_CHECKING:`` are annotations only and do not count."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    base = f"fairprune_jax.{own}".split(".")
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            mods = [f"{mod}.{a.name}" for a in node.names] if mod == "fairprune_jax" else [mod]
        else:
            continue
        found |= {m.split(".")[1] for m in mods if m.startswith("fairprune_jax.")}
    return found - {own}


def test_every_module_sits_in_a_layer():
    """No module at the package's top level but ``__init__.py`` (the old flat paths are aliases there), and
    every sub-package is a layer of :data:`LAYERS`."""
    top = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert top == ["__init__.py"], top
    packages = sorted(p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py"))
    assert packages == sorted(LAYERS), packages


def test_no_layer_imports_a_higher_one():
    bad = []
    for own, allowed in LAYERS.items():
        for path in sorted((PACKAGE_DIR / own).rglob("*.py")):
            extra = imported_packages(path.read_text(), own) - allowed
            if extra:
                bad.append(f"{path.relative_to(PACKAGE_DIR)} imports {sorted(extra)}")
    assert bad == [], ("a module imports a layer above its own (see LAYERS and docs/ARCHITECTURE.md); move the "
                       "shared piece down instead:\n" + "\n".join(bad))


def test_the_layer_check_sees_every_spelling():
    cases = {"from fairprune_jax.running.runner import prepare": {"running"},
             "import fairprune_jax.methods.base": {"methods"},
             "from fairprune_jax import methods": {"methods"},
             "from fairprune_jax import certify": {"certify"},        # an old flat path: not a layer, so refused
             "from ..running import cli": {"running"},
             "from . import masks": set(),
             "def f():\n    from fairprune_jax.training.train import fit\n": {"training"},
             "if TYPE_CHECKING:\n    from fairprune_jax.methods.base import Context\n": set()}
    for src, want in cases.items():
        assert imported_packages(src, "sparsity") == want, src


#: Modules left above the size the layout aims at (about 500 lines), and why.
LONG_MODULES: dict[str, str] = {}


def test_modules_stay_small_and_say_what_they_are_for():
    """Every module opens with a docstring saying what it is for, and none grows far past 500 lines (split it
    by concept, re-exporting the old names, rather than raising the limit)."""
    long, undocumented = [], []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > 560 and rel not in LONG_MODULES:
            long.append(f"{rel} ({len(text.splitlines())} lines)")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(doc.split("\n\n")[0].split()) < 4:
            undocumented.append(rel)
    assert long == [] and undocumented == [], (long, undocumented)


def test_methods_see_their_settings_not_the_run_config():
    """The narrow method contract: a method gets :class:`MethodSettings` (its target, its budget and the training
    choices it shares with the dense run), its parsed options and named random streams, never the run's
    ``RunConfig``; no method or technique module names it or reads a context's config."""
    import dataclasses
    from fairprune_jax.core.config import RunConfig
    from fairprune_jax.methods.base import Context, MethodSettings
    assert "config" not in {f.name for f in dataclasses.fields(Context)}
    run_only = {"method", "method_options", "dataset", "data_dir", "model", "dataset_options", "out", "seed"}
    assert not run_only & {f.name for f in dataclasses.fields(MethodSettings)}
    s = MethodSettings.from_config(RunConfig(epochs=3, lr=0.01))
    assert (s.ft_epochs, s.ft_lr) == (3, 0.01)              # the fine-tuning budget resolved from the run's
    offenders = []
    for sub in ("methods", "techniques"):
        for path in sorted((PACKAGE_DIR / sub).glob("*.py")):
            text = path.read_text()
            if path.name not in ("base.py", "__init__.py") and ("RunConfig" in text or "ctx.config" in text):
                offenders.append(f"{sub}/{path.name}")
    assert offenders == []
