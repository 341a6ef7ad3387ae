"""What decides a run's float rounding on this host: the XLA backend's version and, on the CPU, its vector ISA.

XLA:CPU compiles for the host's instruction set, so the same program rounds differently on a host with
AVX-512 and one with AVX2 only (measured: the committed digits cells, reproduced on an AVX2-only host, differ
from the first digit of the dense model's loss on, and by one or two flipped test rows per cell). Results record
:func:`numerics_key` (``runtime.numerics``) so that a bit-for-bit comparison knows which host it can expect to
match, and ``experiments/reproduce.py`` keeps one reference per key.
"""
from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_isa() -> str:
    """The widest x86 vector extension the host offers (``avx512``, ``avx2``, ``avx``, ``sse``), else the
    machine name (``arm64``, ``aarch64``, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() or "unknown"
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = set(m.group(1).split()) if m else set()
    for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"), ("sse", "sse2")):
        if flag in flags:
            return isa
    return platform.machine() or "unknown"


def numerics_key() -> str:
    """``jaxlib-<version>-<platform>-<isa or device kind>``, e.g. ``jaxlib-0.10.2-cpu-avx2``."""
    import jax
    import jaxlib
    dev = jax.devices()[0]
    kind = cpu_isa() if dev.platform == "cpu" else re.sub(r"[^A-Za-z0-9]+", "_", dev.device_kind).strip("_")
    return f"jaxlib-{jaxlib.__version__}-{dev.platform}-{kind}"


__all__ = ["cpu_isa", "numerics_key"]
