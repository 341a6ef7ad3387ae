"""Named random streams: fold_in keys by default (every stream of every seed its own), the earlier offsets on
request (what committed grids pin), and a finished cell of the earlier kind is not reused under the new one."""
from __future__ import annotations

import dataclasses
import json

import pytest

from fairprune_jax.core.config import LEGACY_RUN_VALUES, RunConfig
from fairprune_jax.methods.base import DERIVED_STREAMS, SEED_STREAMS, Context, MethodSettings, fold_in_seed


def _ctx(seed: int, streams: str) -> Context:
    cfg = RunConfig(dataset="digits", seed=seed, streams=streams)
    return Context.from_config(cfg, dataset=None, fm=None, template=None, flops={}, layer_order=[],
                               eval_step=None)


def test_fold_in_streams_never_collide_across_streams_seeds_and_epochs():
    names = [n for n in [*SEED_STREAMS, *DERIVED_STREAMS] if n != "dense"]
    seen = {}
    for seed in range(20):
        ctx = _ctx(seed, "fold_in")
        assert ctx.stream_seed("dense") == seed                 # the dense run replays the run's seed
        for name in names:
            for epoch in (0, 1, 2):
                s = ctx.stream_seed(name, epoch)
                assert 0 <= s < 2 ** 31 and s == fold_in_seed(seed, name, epoch)   # deterministic
                assert s not in seen, (seed, name, epoch, seen.get(s))
                seen[s] = (seed, name, epoch)
    # the numpy generators differ too, the derived ones included
    a, b = _ctx(0, "fold_in").stream_rng("ballot_holdout"), _ctx(1, "fold_in").stream_rng("ballot_holdout")
    assert a.integers(1 << 30) != b.integers(1 << 30)


def test_offset_streams_are_the_earlier_seeds_and_overlap_across_seeds():
    """What every committed grid pins: seed + offset, so that seed 0's fine-tuning state is seed 1's dense seed
    (the overlap fold_in removes)."""
    c0, c1 = _ctx(0, "offset"), _ctx(1, "offset")
    assert c0.stream_seed("finetune_batches", 2) == 0 + SEED_STREAMS["finetune_batches"] + 2
    assert c0.stream_seed("finetune_state") == c1.stream_seed("dense") == 1
    assert _ctx(0, "fold_in").stream_seed("finetune_state") != 1
    with pytest.raises(KeyError, match="no random stream 'nope'"):
        c0.stream_seed("nope")


def test_method_settings_do_not_carry_the_stream_mode_twice():
    assert "streams" not in {f.name for f in dataclasses.fields(MethodSettings)}
    assert _ctx(3, "offset").with_config(RunConfig(dataset="digits", seed=3)).streams == "fold_in"


def test_a_cell_from_before_fold_in_is_not_reused_unless_the_grid_pins_offset(tmp_path):
    from fairprune_jax.running.compare import load_config, stale_cell
    assert LEGACY_RUN_VALUES == {"streams": "offset"}
    toml = tmp_path / "g.toml"
    toml.write_text('name = "g"\ndataset = "digits"\nmethods = ["magnitude"]\nsparsities = [0.5]\nseeds = [0]\n')
    cc = load_config(toml)
    from fairprune_jax.running.compare import cell_config
    old = json.loads(json.dumps(dataclasses.asdict(cell_config(cc, "magnitude", 0.5, 0)), default=str))
    old.pop("streams")                                   # written before the setting existed
    cell = {"config": old, "method_info": {"options": {}}}
    why = stale_cell(cc, "magnitude", 0.5, 0, cell)
    assert why and "streams" in why and 'set [run] streams = "offset"' in why
    toml.write_text(toml.read_text() + '[run]\nstreams = "offset"\n')
    assert stale_cell(load_config(toml), "magnitude", 0.5, 0, cell) is None
    # a cell that records the setting is compared like any other
    now = dict(old, streams="fold_in")
    assert stale_cell(load_config(toml), "magnitude", 0.5, 0, {"config": now, "method_info": {"options": {}}})


def test_the_cli_takes_the_stream_mode_and_refuses_others(capsys):
    from fairprune_jax.running.cli_args import build_parser, config_from_args
    p = build_parser()
    args = p.parse_args(["run", "--streams", "offset"])
    assert config_from_args(args).streams == "offset"
    assert config_from_args(p.parse_args(["run"])).streams == "fold_in"
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--streams", "sum"])
