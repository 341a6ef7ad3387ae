"""``fairprune run --save-compact``: the compacted model written by the CLI, and the errors it gives up front."""
from __future__ import annotations

import contextlib
import io
import json
import re

import jax
import numpy as np
import pytest

from fairprune_jax.training import checkpoint
from fairprune_jax.sparsity import compact
from fairprune_jax.running import runner
from fairprune_jax.running.cli import main
from fairprune_jax.methods.base import RunConfig
from fairprune_jax.training.train import masked_forward

STRUCTURED = "bifp, fair_then_prune, prune_then_fair, structured_magnitude"


@pytest.fixture(scope="module")
def compact_run(tmp_path_factory):
    """One tiny structured run through the CLI; ``(out_dir, rc, stdout, prepared, pruned state)``."""
    seen = {}
    orig = runner.run_method

    def spy(prep, **kw):
        res = orig(prep, **kw)
        seen["prep"], seen["state"] = prep, res["_state"]
        return res

    d = tmp_path_factory.mktemp("compact_run")
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr(runner, "run_method", spy)
        rc = main(["run", "--dataset", "digits", "--method", "structured_magnitude", "--sparsity", "0.5", "--epochs", "1",
                   "--finetune-epochs", "1", "--checkpoint-every", "0", "--no-progress", "--save-compact",
                   "--out", str(d)])
    return d, rc, buf.getvalue(), seen["prep"], seen["state"]


def test_save_compact_writes_a_smaller_equivalent_model(compact_run):
    d, rc, stdout, prep, state = compact_run
    assert rc == 0
    r = json.loads((d / "results.json").read_text())
    c = r["compact"]
    assert c["path"] == "compact" and (d / "compact" / compact.ARRAYS).is_dir()
    assert f"wrote {d / 'compact'}: {c['params_compact']} of {c['params_dense']} parameters" in stdout
    assert "compacted model in `compact/`" in (d / "results.md").read_text()
    # half the hidden units of the digits MLP (256, 128) are gone
    assert c["architecture"]["model"] == "mlp" and c["architecture"]["options"]["hidden"] == [128, 64]
    assert [k for k, _ in r["method_info"]["kept_units"].values()] == [128, 64]
    assert c["params_compact"] < c["params_dense"] and 0 < c["flops_fraction"] < 1
    assert c["flops_compact"] == pytest.approx(c["flops_fraction"] * c["flops_dense"])
    assert c["check_rows"] == r["sizes"]["test"] and c["max_abs_logit_diff"] <= 1e-5
    # every structured run counts the compacted size from its masks and groups, without building it
    phys = r["sparsity"]["compacted"]
    assert phys["params_kept"] == c["params_compact"] and phys["params_total"] == c["params_dense"]
    assert phys["flops_fraction"] == pytest.approx(c["flops_fraction"], rel=1e-9)
    assert phys["flops_fraction"] < r["sparsity"]["flops_fraction"]          # the masks' count is an upper bound
    assert f"compacted size {phys['params_fraction']:.4f} of the parameters" in stdout

    # the saved model, reloaded without the run's code path, computes the masked model's logits
    small = compact.load(d / c["path"])
    assert small.num_params == c["params_compact"]
    x = prep.dataset.test.x
    ref = jax.jit(lambda p, m, s, xx: masked_forward(prep.ctx.fm, p, m, s, xx, train=False)[0])
    np.testing.assert_allclose(np.asarray(small.apply(x)),
                               np.asarray(ref(state.params, state.masks, state.model_state, x)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, why", [
    (["--method", "magnitude"], "method 'magnitude' prunes individual weights"),
    (["--method", "bifp", "--opt", "structured=False"], "method 'bifp' with structured=False prunes"),
])
def test_unstructured_method_fails_before_training(no_training, capsys, tmp_path, args, why):
    rc = main(["run", "--dataset", "digits", *args, "--save-compact", "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("fairprune: error: --save-compact needs structured masks")
    assert why in err and f"structured methods: {STRUCTURED}" in err
    assert not (tmp_path / "out").exists()


def test_save_compact_needs_an_output_folder(no_training):
    with pytest.raises(ValueError, match=re.escape("--save-compact writes the compacted model into the output "
                                                   "folder; set --out")):
        runner.run(RunConfig(method="structured_magnitude", dataset="digits", save_compact=True, out=None))


def test_save_compact_does_not_change_the_checkpoint_fingerprint():
    """Asking for the compacted model on --resume reuses the run's checkpoints."""
    cfg = RunConfig(method="structured_magnitude", dataset="digits")
    assert checkpoint.fingerprint(cfg) == checkpoint.fingerprint(RunConfig(method="structured_magnitude", dataset="digits",
                                                                           save_compact=True))
