"""The suite's own set-up (tests/conftest.py): compiled without XLA's optimisation passes, except the tests
marked ``default_numerics``, which run again in a process with XLA's default flags."""
from __future__ import annotations

import os

import pytest

from conftest import FAST_COMPILE_FLAGS


def test_the_suite_compiles_without_the_optimisation_passes():
    if os.environ.get("FAIRPRUNE_TEST_XLA_OPT") == "default":
        pytest.skip("FAIRPRUNE_TEST_XLA_OPT=default: the default optimisation everywhere")
    assert set(FAST_COMPILE_FLAGS) <= set(os.environ.get("XLA_FLAGS", "").split())


@pytest.mark.default_numerics
def test_a_default_numerics_test_runs_with_the_default_flags():
    assert not set(FAST_COMPILE_FLAGS) & set(os.environ.get("XLA_FLAGS", "").split())
