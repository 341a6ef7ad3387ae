"""This folder is the fairprune_jax *repository*; the package is the ``fairprune_jax/`` folder inside it.

Python imports this folder as the package when a script runs next to a clone named ``fairprune_jax`` (the
default name of a clone), which used to shadow the installed library (``AttributeError: module
'fairprune_jax' has no attribute 'prune'``). Imported under that name, this file hands every import over to
the package inside this repository and says so, so the script works; run it from another folder (or rename
the clone) to use the installed copy instead. Imported under any other name (a test runner treating the
repository folder as a package), it does nothing.
"""
if __name__ == "fairprune_jax":
    import os as _os
    import warnings as _warnings

    __path__ = [_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "fairprune_jax")]
    _warnings.warn(f"'import fairprune_jax' found the repository folder {_os.path.dirname(__path__[0])} in the "
                   "working directory (a clone named fairprune_jax) before the installed package; the package "
                   "inside that clone is used. Run your script from another folder, or rename the clone, to use "
                   "the installed copy", UserWarning, stacklevel=2)
    with open(_os.path.join(__path__[0], "__init__.py")) as _f:
        exec(compile(_f.read(), _os.path.join(__path__[0], "__init__.py"), "exec"))
