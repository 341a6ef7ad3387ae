"""The import rule of ``methods/``: a method file imports ``methods/base.py`` and modules below it, never
another method file, so one method can be read, changed or removed without the others.
Shared machinery (the gradual-pruning start, rewinding, objectives) lives one floor below, in
``fairprune_jax/``. Parsed with ``ast``: nothing is imported, so this is fast and sees imports inside functions.
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
        "(e.g. fairprune_jax/techniques/gradual.py, rewind.py, constrained.py)")


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
