"""Method options at their edges (a fourteenth tester's round): contradictory or misspelled values refused
before any data loads, naming the option; "0 = no cap" accepted where documented; an option read only with
another one named when given without it."""
from __future__ import annotations

import dataclasses

import pytest

from fairprune_jax.core.config import RunConfig
from fairprune_jax.running.validation import validate_config


def _cfg(method, distribution="uniform", **opts):
    return RunConfig(method=method, dataset="digits", sparsity=0.9, distribution=distribution, method_options=opts)


@pytest.mark.parametrize("method, opts, match", [
    ("ballot", {"final_layer_only": True, "scope": "all"}, "final_layer_only=true means scope=classifier"),
    ("ballot", {"scope": "all", "body": "lth"}, "scope=all makes every layer vote"),
    ("prune_then_fair", {"reduce": "maxgap"}, "reduce='maxgap' is not one of max_gap, mean_abs"),
    ("bifp", {"strict": "metrc"}, "strict='metrc' is not one of"),
    ("bifp", {"constraint": "pergroup"}, "constraint='pergroup' is not one of"),
    ("bifp", {"fairness": "autoo"}, "fairness='autoo': unknown fairness surrogate"),
])
def test_contradictory_or_misspelled_options_are_refused_by_name(method, opts, match):
    with pytest.raises(ValueError, match=match):
        validate_config(_cfg(method, **opts))


def test_erk_is_refused_for_structured_masks():
    with pytest.raises(ValueError, match="erk sets a density per layer for unstructured masks"):
        validate_config(_cfg("structured_magnitude", distribution="erk"))
    validate_config(_cfg("magnitude", distribution="erk"))


@pytest.mark.parametrize("method, key", [("lth", "max_rounds"), ("ballot", "body_rounds"),
                                         ("fairgrape", "max_decisions")])
def test_zero_means_no_cap_where_the_docs_say_so(method, key):
    assert getattr(validate_config(_cfg(method, **{key: 0})), key) == 0


def test_an_option_read_only_with_another_is_named_when_given_alone():
    with pytest.warns(UserWarning, match="buffer_size is read only with buffers=true"):
        validate_config(_cfg("el", buffer_size=2))
    with pytest.warns(UserWarning, match="select_points is read only with early_stop=true"):
        validate_config(_cfg("nft", select_points=3))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(dataclasses.replace(_cfg("nft", select_points=3, early_stop=True)))
