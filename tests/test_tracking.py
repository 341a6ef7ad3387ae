"""TensorBoard tracking: event files that parse (TFRecord framing with CRCs, Event protos; no TensorFlow) and hold
the per-step, per-group multiplier series of a constrained run, summarised the same way in results.json."""
import numpy as np
import pytest

pytest.importorskip("tensorboardX")

from fairprune_jax.training import tracking  # noqa: E402
from fairprune_jax.methods import RunConfig  # noqa: E402
from fairprune_jax.running.runner import run  # noqa: E402


def test_series_round_trip_and_summary(tmp_path):
    (tmp_path / "events.out.tfevents.1.old").write_bytes(b"stale")      # an earlier run's file is removed
    with tracking.use(tracking.TensorBoard(tmp_path, group_names=["group a", "b"])) as tb:
        ph = tb.phase("fine-tune (ceag)")
        assert ph == "fine-tune_ceag" and tb.phase("fine-tune (ceag)") == "fine-tune_ceag_2"
        stats = [{"loss": np.float32(1.0 / s), "multipliers": np.array([0.1 * s, 0.0]),
                  "violation": np.array([np.nan, -0.5])} for s in range(1, 6)]
        tb.log(ph, [1, 2, 3, 4, 5], stats)
        summary = tb.summary()
    assert not (tmp_path / "events.out.tfevents.1.old").exists()
    s = tracking.read_scalars(tmp_path)
    assert [st for st, _ in s["fine-tune_ceag/multipliers/group_a"]] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in s["fine-tune_ceag/multipliers/group_a"]], [0.1, 0.2, 0.3, 0.4, 0.5],
                               rtol=1e-6)
    assert "fine-tune_ceag/violation/group_a" not in s          # never observed (NaN): no points
    assert len(s["fine-tune_ceag/violation/b"]) == 5 and len(s["fine-tune_ceag/loss"]) == 5
    mult = summary["phases"]["fine-tune_ceag"]["per_group"]["multipliers"]
    assert mult["groups"] == ["group a", "b"] and mult["last"] == [0.5, 0.0] and mult["first"] == [0.1, 0.0]
    assert summary["phases"]["fine-tune_ceag"]["scalars"]["loss"] == {"first": 1.0, "last": 0.2, "min": 0.2,
                                                                      "max": 1.0}


def test_many_groups_are_summarised_not_one_series_each(tmp_path):
    with tracking.use(tracking.TensorBoard(tmp_path, max_group_series=4)) as tb:
        ph = tb.phase("x")
        tb.log(ph, [1, 2], [{"multipliers": np.arange(10.0) * s} for s in (1, 2)])
    s = tracking.read_scalars(tmp_path)
    assert sorted(s) == ["x/multipliers/max", "x/multipliers/mean"] and s["x/multipliers/max"][-1] == (2, 18.0)


def test_corrupt_event_file_is_an_error(tmp_path):
    with tracking.use(tracking.TensorBoard(tmp_path)) as tb:
        tb.log(tb.phase("x"), [1], [{"loss": 1.0}])
    f = next(tmp_path.glob(tracking.EVENT_GLOB))
    raw = bytearray(f.read_bytes())
    raw[-6] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        tracking.read_scalars(tmp_path)


def test_a_partial_last_record_ends_the_reading(tmp_path):
    """The event file of a run still writing its last record reads up to that record (it used to raise
    struct.error); a corrupt complete record is still an error (above)."""
    with tracking.use(tracking.TensorBoard(tmp_path)) as tb:
        tb.log(tb.phase("x"), [1, 2], [{"loss": 1.0}, {"loss": 0.5}])
    f = next(tmp_path.glob(tracking.EVENT_GLOB))
    full = tracking.read_scalars(tmp_path)
    raw = f.read_bytes()
    for cut in (3, 10, 20):                     # inside the last record's header, header CRC, data
        f.write_bytes(raw[:-cut])
        got = tracking.read_scalars(tmp_path)
        assert all(v == full[k][:len(v)] for k, v in got.items())      # what was read is a prefix of the run
        assert sum(map(len, got.values())) < sum(map(len, full.values()))


def test_ceag_run_logs_every_step_of_every_multiplier(tmp_path):
    cfg = RunConfig(method="ceag", dataset="digits", sparsity=0.9, epochs=1, finetune_epochs=1, progress=False,
                    model_options={"hidden": [16]}, method_options={"eps": 0.0, "constraint_data": "train"},
                    out=str(tmp_path / "run"))
    with tracking.use(tracking.TensorBoard(tmp_path / "run" / "tensorboard")):
        res = run(cfg)
    s = tracking.read_scalars(tmp_path / "run" / "tensorboard")
    names = [g.replace(" ", "_") for g in res["groups"]["names"]]
    steps = res["tracking"]["phases"]["fine-tune_ceag"]["steps"]
    assert steps > 0 and len(s["dense/loss"]) > 0 and len(s["fine-tune_ceag/accuracy"]) == steps
    final = res["method_info"]["multipliers"]
    for g, lam in zip(names, final):
        series = s[f"fine-tune_ceag/multipliers/{g}"]
        assert [st for st, _ in series] == list(range(1, steps + 1))
        assert series[-1][1] == pytest.approx(lam, abs=1e-6)
    assert max(final) > 0           # eps = 0: some constraint is violated, so the series are not all zeros
    summary = res["tracking"]["phases"]["fine-tune_ceag"]["per_group"]
    np.testing.assert_allclose(summary["multipliers"]["last"], final, atol=1e-6)
    assert {"violation", "group_accuracy"} <= set(summary) and res["tracking"]["logdir"] == "tensorboard"


def test_tensorboards_own_loader_reads_our_event_files(tmp_path):
    """What the TensorBoard UI would show: TensorBoard's own EventAccumulator reads the same scalars, steps and
    values from our files as our reader does (tensorboard is in the test extra, so this runs in CI)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with tracking.use(tracking.TensorBoard(tmp_path, group_names=["g0", "g1"])) as tb:
        ph = tb.phase("fine-tune (ceag)")
        tb.log(ph, [1, 2, 3], [{"loss": np.float32(0.5 * s), "multipliers": np.array([0.1 * s, 0.2])}
                               for s in (1, 2, 3)])
        tb.flush()
    ours = tracking.read_scalars(tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    theirs = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert set(theirs) == set(ours) and "fine-tune_ceag/multipliers/g1" in theirs
    for tag in ours:
        assert [s for s, _ in theirs[tag]] == [s for s, _ in ours[tag]]
        np.testing.assert_allclose([v for _, v in theirs[tag]], [v for _, v in ours[tag]], rtol=1e-6)
