"""UTKFace loader: the real 23,705 staged images (decoded once, cached) and small synthetic folders."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from fairprune_jax.data import load_dataset
from fairprune_jax.data import utkface as utk
from fairprune_jax.data.utkface import load_utkface, parse_utkface_name

SHARED = Path(os.environ.get("FAIRPRUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
UTK = SHARED / "utkface64"
needs_data = pytest.mark.skipif(not UTK.is_dir(), reason=f"UTKFace not staged at {UTK}")

RACE_COUNTS = {"White": 10_078, "Black": 4_526, "Asian": 3_434, "Indian": 3_975, "Others": 1_692}
GENDER_COUNTS = {"male": 12_391, "female": 11_314}
RACE_GENDER = {("White", "male"): 5_477, ("White", "female"): 4_601, ("Black", "male"): 2_318,
               ("Black", "female"): 2_208, ("Asian", "male"): 1_575, ("Asian", "female"): 1_859,
               ("Indian", "male"): 2_261, ("Indian", "female"): 1_714, ("Others", "male"): 760,
               ("Others", "female"): 932}
AGE_COUNTS = {"0-9": 3_062, "10-19": 1_531, "20-39": 11_880, "40-59": 4_544, "60+": 2_688}


def _both(ds):
    return np.concatenate([ds.train.y, ds.test.y]), np.concatenate([ds.train.g, ds.test.g])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("utkface_cache")


@pytest.fixture(scope="module")
def utk32(cache_dir):
    """The one full decode of this test session (image_size=32, race x gender groups)."""
    if not UTK.is_dir():
        pytest.skip(f"UTKFace not staged at {UTK}")
    ds = load_dataset("utkface", str(UTK), image_size=32, protected="race,gender", cache_dir=str(cache_dir))
    assert ds.meta["cache_hit"] is False
    return ds


# ---------------------------------------------------------------- real data

@needs_data
def test_counts_per_race_gender_and_intersection(utk32):
    ds = utk32
    assert len(ds.train) + len(ds.test) == 23_705
    assert ds.meta["num_images"] == 23_705 and ds.meta["skipped_unparsable_names"] == 0
    assert ds.class_names == list(RACE_COUNTS)
    y, g = _both(ds)
    assert dict(zip(ds.class_names, np.bincount(y, minlength=5).tolist())) == RACE_COUNTS
    assert ds.group_attrs == ["race", "gender"]
    assert ds.group_names == [f"{r}|{s}" for r in RACE_COUNTS for s in ("male", "female")]
    counts = dict(zip(ds.group_names, np.bincount(g).tolist()))
    assert counts == {f"{r}|{s}": n for (r, s), n in RACE_GENDER.items()}
    gender = {s: sum(n for (r, s2), n in RACE_GENDER.items() if s2 == s) for s in ("male", "female")}
    assert gender == GENDER_COUNTS
    assert sum(counts[f"{r}|male"] for r in RACE_COUNTS) == GENDER_COUNTS["male"]


@needs_data
def test_shapes_range_split_and_channel_stats(utk32):
    ds = utk32
    assert ds.input_shape == (32, 32, 3)
    assert ds.train.x.dtype == np.float32
    assert float(ds.train.x.min()) >= 0.0 and float(ds.train.x.max()) <= 1.0
    assert float(ds.train.x.max()) == 1.0
    assert len(ds.test) == pytest.approx(0.2 * 23_705, abs=10)
    for k in range(ds.num_groups):  # stratified by group
        n_te, n_tr = (ds.test.g == k).sum(), (ds.train.g == k).sum()
        assert n_te / (n_te + n_tr) == pytest.approx(0.2, abs=0.005)
    mean = ds.train.x.mean(axis=(0, 1, 2), dtype=np.float64)
    std = ds.train.x.std(axis=(0, 1, 2), dtype=np.float64)
    np.testing.assert_allclose(ds.meta["channel_mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(ds.meta["channel_std"], std, rtol=1e-4)
    assert ds.meta["normalized"] is False
    # images differ from each other (decoded, not zeros) and labels line up with file names
    assert float(ds.train.x.std()) > 0.1


@needs_data
def test_cache_hit_does_not_decode(utk32, cache_dir, monkeypatch):
    files = list(Path(cache_dir).glob("utkface_32px_*.npz"))
    assert len(files) == 1
    calls = []

    def no_decode(*args, **kwargs):
        calls.append(args)
        raise AssertionError("decoded although the cache should have been used")

    monkeypatch.setattr(utk, "_decode_files", no_decode)
    again = load_utkface(UTK, image_size=32, protected="race,gender", cache_dir=cache_dir)
    assert calls == []
    assert again.meta["cache_hit"] is True and again.meta["cache_file"] == str(files[0])
    np.testing.assert_array_equal(again.train.x, utk32.train.x)
    np.testing.assert_array_equal(again.test.g, utk32.test.g)

    # another target/grouping reuses the same cache: age buckets as in the README, and exact ages x gender
    # (the hundreds-of-groups setting), with a validation split and normalization
    ages = sorted({int(n.split("_")[0]) for n in os.listdir(UTK)})
    yrs = load_utkface(UTK, image_size=32, target="age", protected="age_years,gender", cache_dir=cache_dir,
                       val_fraction=0.1, normalize=True)
    assert calls == []
    y = np.concatenate([yrs.train.y, yrs.val.y, yrs.test.y])
    g = np.concatenate([yrs.train.g, yrs.val.g, yrs.test.g])
    assert len(y) == 23_705
    assert yrs.class_names == list(AGE_COUNTS)
    assert dict(zip(yrs.class_names, np.bincount(y).tolist())) == AGE_COUNTS
    assert yrs.group_attrs == ["age_years", "gender"]
    assert yrs.group_names[:2] == [f"{ages[0]}|male", f"{ages[0]}|female"]
    assert len(yrs.group_names) == len({tuple(n.split("_")[:2]) for n in os.listdir(UTK)}) > 150
    per_group = np.bincount(g)
    for sex, n in GENDER_COUNTS.items():
        assert sum(c for name, c in zip(yrs.group_names, per_group) if name.endswith("|" + sex)) == n
    assert len(yrs.val) == pytest.approx(0.1 * len(yrs.train) / 0.9, rel=0.05)
    np.testing.assert_allclose(yrs.train.x.mean(axis=(0, 1, 2), dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(yrs.train.x.std(axis=(0, 1, 2), dtype=np.float64), 1.0, atol=1e-5)
    assert yrs.meta["normalized"] is True


# ---------------------------------------------------------------- small synthetic folders

def test_parse_names_and_quirks():
    assert parse_utkface_name("25_1_2_20170116174525125.jpg.chip.jpg") == (25, 1, 2)
    assert parse_utkface_name("24_0_1_20170116220224657 .jpg.chip.jpg") == (24, 0, 1)
    assert parse_utkface_name("55_0_0_20170116232725357jpg.chip.jpg") == (55, 0, 0)
    assert parse_utkface_name("39_1_20170116174525125.jpg.chip.jpg") is None  # no race field
    assert parse_utkface_name("25_2_0_2017.jpg") is None  # gender out of range
    assert parse_utkface_name("25_0_7_2017.jpg") is None  # race out of range
    assert parse_utkface_name("x_0_0_2017.jpg") is None


def _make_images(d: Path, n_per_cell: int = 3, races=range(5), seed: int = 0) -> dict[str, np.ndarray]:
    """Small 20x20 JPEG/PNG faces with a colour that encodes the file, so decoded pixels can be checked."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    made = {}
    k = 0
    for race in races:
        for gender in (0, 1):
            for i in range(n_per_cell):
                age = int(rng.integers(1, 90))
                name = f"{age}_{gender}_{race}_2017011617452{k:04d}.jpg.chip.jpg"
                color = np.array([10 * k % 256, 255 - (7 * k) % 256, 128], np.uint8)
                arr = np.broadcast_to(color, (20, 20, 3)).copy()
                Image.fromarray(arr).save(d / name, format="PNG")  # lossless; the suffix does not matter to PIL
                made[name] = color
                k += 1
    return made


def test_bad_names_and_corrupt_images_are_skipped_with_one_warning_each(tmp_path):
    d = tmp_path / "faces"
    made = _make_images(d)
    # quirky but valid names, copied from the README
    src = next(iter(made))
    shutil.copy(d / src, d / "24_0_1_20170116220224657 .jpg.chip.jpg")
    shutil.copy(d / src, d / "55_0_0_20170116232725357jpg.chip.jpg")
    for bad in ("39_1_20170116174525125.jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg", "face.jpg",
                "1_5_0_2017.jpg"):
        shutil.copy(d / src, d / bad)
    (d / "30_0_3_20170101000000001.jpg.chip.jpg").write_bytes(b"this is not a jpeg")
    (d / "31_1_3_20170101000000002.jpg.chip.jpg").write_bytes((d / src).read_bytes()[:60])  # truncated
    (d / "notes.txt").write_text("ignored: not an image")

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = load_utkface(d, image_size=8, cache_dir=tmp_path / "cache", test_fraction=0.25)
    msgs = [str(w.message) for w in rec]
    name_warn = [m for m in msgs if "do not parse" in m]
    corrupt_warn = [m for m in msgs if "could not be decoded" in m]
    assert len(name_warn) == 1 and "skipped 4 file(s)" in name_warn[0]
    assert len(corrupt_warn) == 1 and "skipped 2 image file(s)" in corrupt_warn[0]
    assert ds.meta["skipped_unparsable_names"] == 4
    assert ds.meta["skipped_corrupt_images"] == 2
    n = len(made) + 2
    assert len(ds.train) + len(ds.test) == n
    assert ds.input_shape == (8, 8, 3)
    y, g = _both(ds)
    assert np.bincount(y, minlength=5).tolist() == [7, 7, 6, 6, 6]  # +1 White, +1 Black from the quirky copies

    # the cached load repeats the corrupt-file warning and does not decode
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        again = load_utkface(d, image_size=8, cache_dir=tmp_path / "cache", test_fraction=0.25)
    assert again.meta["cache_hit"] is True
    assert sum("could not be decoded" in str(w.message) for w in rec) == 1


def test_decoded_pixels_resize_and_default_cache_location(tmp_path, monkeypatch):
    d = tmp_path / "faces"
    made = _make_images(d, n_per_cell=2)
    monkeypatch.setenv("FAIRPRUNE_CACHE", str(tmp_path / "user-cache"))
    ds = load_utkface(d, image_size=12, target="gender", protected="race", num_workers=1)
    # default: the user's cache ($FAIRPRUNE_CACHE here), never the data folder
    assert ds.meta["cache_file"].startswith(str(tmp_path / "user-cache"))
    assert not (d / ".cache").exists()
    assert ds.input_shape == (12, 12, 3)
    # every decoded image is one of the solid colours we wrote, at the new size
    colors = {tuple(c.tolist()) for c in made.values()}
    for img in np.concatenate([ds.train.x, ds.test.x]):
        px = np.rint(img * 255).astype(int)
        assert (px == px[0, 0]).all()
        assert tuple(px[0, 0].tolist()) in colors
    files = utk._list_images(d)
    assert len(files) == len(made)


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    d = tmp_path / "faces"
    _make_images(d, n_per_cell=2)
    (d / "1_0_0_20170101000000009.jpg.chip.jpg").write_bytes(b"garbage")
    paths = sorted(str(p) for p in d.iterdir())
    serial_x, serial_ok = utk._decode_files(paths, 16, num_workers=1)
    monkeypatch.setattr(utk, "SERIAL_DECODE_BELOW", 0)
    par_x, par_ok = utk._decode_files(paths, 16, num_workers=2)
    np.testing.assert_array_equal(par_ok, serial_ok)
    np.testing.assert_array_equal(par_x, serial_x)
    assert (~serial_ok).sum() == 1


def test_missing_race_group_is_warned_and_dropped(tmp_path):
    d = tmp_path / "faces"
    _make_images(d, n_per_cell=4, races=[0, 1, 3])  # no Asian, no Others
    with pytest.warns(UserWarning, match=r"2 protected group\(s\) have no rows.*Asian, Others"):
        ds = load_utkface(d, image_size=8, target="gender", protected="race", cache_dir=tmp_path / "c")
    assert ds.group_names == ["White", "Black", "Indian"]
    assert sorted(set(np.concatenate([ds.train.g, ds.test.g]).tolist())) == [0, 1, 2]
    # an intersection that never occurs is dropped quietly (no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inter = load_utkface(d, image_size=8, target="gender", protected="gender", cache_dir=tmp_path / "c")
    assert inter.group_names == ["male", "female"]


def test_split_is_seeded(tmp_path):
    d = tmp_path / "faces"
    _make_images(d, n_per_cell=6)
    a = load_utkface(d, image_size=8, seed=1, cache_dir=tmp_path / "c")
    b = load_utkface(d, image_size=8, seed=1, cache_dir=tmp_path / "c")
    c = load_utkface(d, image_size=8, seed=2, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(a.test.x, b.test.x)
    assert not np.array_equal(a.test.x, c.test.x)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*\[age\]_\[gender\]_\[race\]"):
        load_utkface(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no UTKFace images found"):
        load_utkface(tmp_path / "empty")
    with pytest.raises(ValueError, match="valid choices: race, gender, age, age_years"):
        load_utkface(tmp_path / "empty", protected="race,ethnicity")
    with pytest.raises(ValueError, match="valid choices: race, gender, age$"):
        load_utkface(tmp_path / "empty", target="age_years")
    with pytest.raises(ValueError, match="image_size"):
        load_utkface(tmp_path / "empty", image_size=0)
