"""What the user sees besides results: the library's warnings (one category, raised at the user's own call
site) and whether progress bars are shown (when a person is watching).

Every warning fairprune gives about the user's data, settings or results is a :class:`FairpruneWarning` (a
``UserWarning``), raised with :func:`warn`, which points it at the first stack frame outside this package:
from Python, the line of the user's script that called ``prune()`` or ``load_dataset()``, not a line inside
the library. The command line prints each of them once as a ``WARNING:`` line (``cli._warnings_once``),
recognised by the category rather than by file names.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

#: The package folder (this file is in its ``core/``): frames under it are the library's, not the user's.
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class FairpruneWarning(UserWarning):
    """A warning about the user's data, settings or results."""


def warn(message: str, category: type[Warning] = FairpruneWarning) -> None:
    """``warnings.warn`` at the first frame outside fairprune_jax (the user's call site)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def human_watching() -> bool:
    """Progress bars by default only where a person watches: a terminal or a notebook, not CI (``CI`` set) and
    not output piped into a file (where every bar update becomes a line of the log)."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        return False
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _tqdm():
    """tqdm's notebook-aware bar; without ipywidgets it falls back to text bars, silently (tqdm would warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm as bar
    return bar


tqdm = _tqdm()


# ---------------------------------------------------------------------------
# Ctrl-C that always stops a run
# ---------------------------------------------------------------------------

_INTERRUPT = {"requested": False}


@contextlib.contextmanager
def interrupts_kept():
    """While the block runs (the command line's run and compare), Ctrl-C (SIGINT) always stops it: the handler
    records the request and raises ``KeyboardInterrupt``; where Python drops that exception (it fired inside a
    garbage-collector callback of JAX: "Exception ignored in ..."), the training loop and the writing of results
    raise it again (:func:`raise_if_interrupted`), so a run the user stopped never finishes and replaces the
    results of the run before it. A process that ignores SIGINT (a shell script's background job, ``nohup``)
    keeps ignoring it: the shell set that so that Ctrl-C in its terminal does not stop the job."""
    import signal
    import threading
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return

    def handler(signum, frame):
        _INTERRUPT["requested"] = True
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    _INTERRUPT["requested"] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        _INTERRUPT["requested"] = False


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed under :func:`interrupts_kept` (a request whose first raise
    was dropped); a host-side flag read, free in a training step's loop."""
    if _INTERRUPT["requested"]:
        raise KeyboardInterrupt
