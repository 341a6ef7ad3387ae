"""Everything that can be wrong with a run's request, checked before any data is loaded or any step is
compiled: the sparsity, method and its options, dataset and model names, model options and every number of
the :class:`RunConfig` (:func:`validate_config`), plus the psi bound the run's certificate checks
(:func:`certify_eps`). ``fairprune compare`` runs the same checks on every cell of a grid up front.
"""
from __future__ import annotations

import math
from typing import Any

from fairprune_jax.core.config import STREAM_MODES
from fairprune_jax.core.notices import warn
from fairprune_jax.data import DATASETS
from fairprune_jax.metrics import certify
from fairprune_jax.methods import RunConfig, get_method
from fairprune_jax.methods.base import DEFAULT_CERTIFY_EPS, structured_methods
from fairprune_jax.models import MODELS
from fairprune_jax.sparsity.masks import DISTRIBUTIONS, check_nm, check_sparsity, nm_pattern


#: ``RunConfig.dataset`` of a run on arrays given in memory (``fairprune_jax.prune``): no loader, the
#: :class:`Dataset` is passed to :func:`prepare`.
IN_MEMORY = "arrays"


#: Method options read only when another option has a value: ``{method: {option: (switch, value)}}``; given
#: without it, a run warns that it ignores them.
INERT_WITHOUT = {"el": {"buffer_size": ("buffers", True)},
                 "nft": {"select_points": ("early_stop", True), "val_fraction": ("early_stop", True)}}


def validate_config(cfg: RunConfig) -> Any:
    """Fail fast, with the valid choices, before any long work; returns the method's parsed options."""
    check_sparsity(cfg.sparsity)
    method = get_method(cfg.method)
    opts = method.parse(cfg.method_options)
    for key, (switch, on) in INERT_WITHOUT.get(cfg.method, {}).items():
        if key in (cfg.method_options or {}) and getattr(opts, switch, on) != on:
            warn(f"{cfg.method}: {key} is read only with {switch}={str(on).lower()}, so this run ignores it "
                 f"(add --opt {switch}={str(on).lower()}, or drop {key})")
    if cfg.save_compact and not method.is_structured(opts):
        why = (f"method {cfg.method!r} with structured={getattr(opts, method.structured)!r}"
               if isinstance(method.structured, str) else f"method {cfg.method!r}")
        raise ValueError(f"--save-compact needs structured masks (whole neurons / channels removed), but {why} "
                         f"prunes individual weights, which no smaller dense model can hold; structured "
                         f"methods: {', '.join(structured_methods())}")
    if cfg.dataset not in DATASETS and cfg.dataset != IN_MEMORY:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; valid choices: {', '.join(sorted(DATASETS))}")
    if cfg.model is not None and cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; valid choices: {', '.join(sorted(MODELS))}")
    check_model_options(cfg.model, cfg.model_options)
    if cfg.distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown sparsity distribution {cfg.distribution!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if cfg.distribution == "erk" and method.is_structured(opts):
        raise ValueError(f"{cfg.method}: --distribution erk sets a density per layer for unstructured masks; "
                         "structured masks remove whole units at one share per layer (uniform) or by one "
                         "global ranking (global): choose one of those")
    if nm_pattern(cfg.distribution) is not None:
        try:
            check_nm(cfg.sparsity, cfg.distribution, structured=method.is_structured(opts))
        except ValueError as e:
            raise ValueError(f"{cfg.method}: {e}") from None
        n, m = nm_pattern(cfg.distribution)
        if 0 < cfg.sparsity < 1.0 - n / m - 1e-9:       # the pattern is exactly 1 - N/M (a schedule passes below)
            raise ValueError(f"{cfg.distribution} keeps {n} of every {m} weights, a sparsity of exactly "
                             f"{1 - n / m:g}; a target of {cfg.sparsity:g} gives no layer that pattern (use "
                             f"--sparsity {1 - n / m:g}, or an unstructured distribution)")
        why = method.nm_refusal(opts)
        if why:
            raise ValueError(f"{cfg.method}: --distribution {cfg.distribution} needs masks chosen by an N:M pattern, "
                             f"but {why}; use an unstructured distribution, or a method that prunes by scores")
    for name in ("epochs", "batch_size"):
        if name == "epochs" and cfg.dataset == IN_MEMORY and int(cfg.epochs) == 0:
            continue        # prune(epochs=0): the given module is the trained dense model
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(cfg, name)}")
    if cfg.ft_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0; got {cfg.ft_epochs}")
    # every number of the run config is finite (nan / inf would fail late, or pass silently as a bound)
    for name in ("sparsity", "lr", "finetune_lr", "weight_decay", "certify_eps", "certify_level",
                 "fairness_bound"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(float(v))):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number; got {v!r}")
    if float(cfg.weight_decay) < 0:
        raise ValueError(f"--weight-decay must be >= 0; got {cfg.weight_decay}")
    for name in ("certify_eps", "fairness_bound"):
        v = getattr(cfg, name)
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} is a bound on a difference of rates, in [0, 1]; got {v}")
    if not (cfg.lr > 0 and cfg.ft_lr > 0):
        raise ValueError(f"learning rates must be > 0; got lr={cfg.lr}, finetune_lr={cfg.ft_lr}")
    if not 0.5 < float(cfg.certify_level) < 1.0:
        raise ValueError(f"--certify-level must be in (0.5, 1), e.g. 0.95 (the certified bound is one-sided); "
                         f"got {cfg.certify_level}")
    if cfg.streams not in STREAM_MODES:
        raise ValueError(f"--streams must be one of {', '.join(STREAM_MODES)}; got {cfg.streams!r}")
    if cfg.certify_interval not in certify.PSI_METHODS:
        raise ValueError(f"--certify-interval must be one of {', '.join(certify.PSI_METHODS)}; got "
                         f"{cfg.certify_interval!r}")
    if not 0 <= int(cfg.seed) < 2 ** 32:
        raise ValueError(f"--seed must be an integer in [0, 2**32) (it seeds numpy and JAX); got {cfg.seed}")
    if int(cfg.positive_label) < 0:
        raise ValueError(f"--positive-class must be a class id >= 0; got {cfg.positive_label}")
    if cfg.small_group < 0:
        raise ValueError(f"--small-group must be >= 0; got {cfg.small_group}")
    return opts


def model_option_names(model: str) -> list[str]:
    """The options a model takes (``--model-opt`` / a compare TOML's ``[model_options]``)."""
    import inspect
    skip = {"self", "in_features", "in_channels", "num_classes", "rngs"}
    return [p for p in inspect.signature(MODELS[model].__init__).parameters if p not in skip]


def check_model_options(model: str | None, options: dict) -> None:
    """Unknown model options are an error naming the valid ones (for ``model=None``: valid for some model)."""
    names = sorted(set(model_option_names(model)) if model is not None
                   else {o for m in MODELS for o in model_option_names(m)})
    unknown = sorted(set(options) - set(names))
    if unknown:
        which = f"model {model!r}" if model is not None else "any model (" + ", ".join(sorted(MODELS)) + ")"
        raise ValueError(f"unknown model option(s) {unknown} for {which}; valid: {', '.join(names)}")
    if model is not None:
        check_model_option_values(model, options)


def check_model_option_values(model: str, options: dict) -> None:
    """Each model option's value has the kind of its default: a width a positive integer, a list of widths a
    non-empty list of positive integers (``hidden=(64,)``, not ``hidden=64``), a flag true or false."""
    import inspect
    params = inspect.signature(MODELS[model].__init__).parameters
    for key, value in options.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            want = "a positive number"
        elif isinstance(default, (tuple, list)) and all(isinstance(d, int) for d in default):
            ok = (isinstance(value, (tuple, list)) and len(value) > 0
                  and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
            want = f"a non-empty list of positive integers, like {tuple(default)!r} (one value: ({default[0]},))"
        else:
            continue
        if not ok:
            raise ValueError(f"model option {key}={value!r} for model {model!r}: {key} takes {want}")


def certify_eps(cfg: RunConfig) -> float:
    """The psi bound the certificate checks: ``certify_eps``, else the bound the method promises (its declared
    ``psi_bound`` option, ceag's ``eps``), else the default."""
    if cfg.certify_eps is not None:
        return float(cfg.certify_eps)
    method = get_method(cfg.method)
    eps = method.promised_bound(method.parse(cfg.method_options))
    return DEFAULT_CERTIFY_EPS if eps is None else float(eps)
