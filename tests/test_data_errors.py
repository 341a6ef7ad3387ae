"""Bad input gives clear errors: unknown datasets/options/attributes, missing files, bad fractions."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from fairprune_jax.data import DATASETS, load_dataset, loader_options
from fairprune_jax.data.adult import load_adult
from fairprune_jax.data.base import Split, carve_validation, encode_groups


def test_registry_names():
    assert {"digits", "utkface", "adult", "csv", "tfds:cifar10", "tfds:cifar100", "tfds:celeb_a"} <= set(DATASETS)
    for name in DATASETS:
        opts = loader_options(name)
        assert "seed" in opts and "val_fraction" in opts, name


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; valid choices: adult, celeba, cifar10, cifar100, "
                                         r"csv, digits, fairface"):
        load_dataset("mnist")


def test_unknown_option_lists_the_loaders_options(tmp_path):
    with pytest.raises(ValueError, match=r"dataset 'utkface' does not take option\(s\) 'img_size'; valid options: "
                                         r"target, protected, image_size, test_fraction, val_fraction, seed"):
        load_dataset("utkface", str(tmp_path), img_size=32)
    with pytest.raises(ValueError, match=r"'adult' does not take option\(s\) 'target', 'image_size'.*"
                                         r"valid options: protected, include_protected, val_fraction, seed"):
        load_dataset("adult", str(tmp_path), target="income", image_size=32)
    with pytest.raises(ValueError, match=r"'digits' does not take option\(s\) 'protected'"):
        load_dataset("digits", protected="race")
    # None means "not given": the loader's default applies
    ds = load_dataset("digits", None, val_fraction=None, seed=None, protected=None)
    assert ds.val is None and ds.meta["split_seed"] == 0


def test_adult_missing_files_name_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope does not exist.*adult\.data and adult\.test"):
        load_adult(tmp_path / "nope")
    d = tmp_path / "adult"
    d.mkdir()
    (d / "adult.data").write_text("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, "
                                  "Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K\n")
    with pytest.raises(FileNotFoundError, match=r"adult\.test not found.*expected a folder with the original UCI"):
        load_adult(d)
    with pytest.raises(ValueError, match=r"unknown protected attribute 'gender'; valid choices: sex, race, age"):
        load_adult(d, protected="sex,gender")
    with pytest.raises(ValueError, match="given more than once"):
        load_adult(d, protected="sex,sex")


def test_adult_malformed_rows(tmp_path):
    d = tmp_path / "adult"
    d.mkdir()
    good = ("39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, "
            "2174, 0, 40, United-States, <=50K\n")
    (d / "adult.data").write_text(good + "39, State-gov, 77516\n")
    (d / "adult.test").write_text("|1x3 Cross validator\n" + good.replace("<=50K", "<=50K."))
    with pytest.raises(ValueError, match="has 3 fields, expected 15"):
        load_adult(d)
    (d / "adult.data").write_text(good.replace("<=50K", "maybe"))
    with pytest.raises(ValueError, match="unexpected income labels"):
        load_adult(d)


def test_fractions_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        load_dataset("digits", val_fraction=1.5)
    s = Split(np.zeros((10, 2)), np.zeros(10), np.arange(10) % 2)
    with pytest.raises(ValueError, match="val_fraction"):
        carve_validation(s, -0.1, 0)
    tr, va = carve_validation(s, 0.2, 0)
    assert len(tr) == 8 and len(va) == 2 and set(va.g.tolist()) == {0, 1}
    csv = tmp_path / "t.csv"
    csv.write_text("a,g,y\n" + "".join(f"{i},{i % 2},{i % 3}\n" for i in range(30)))
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        load_dataset("csv", str(csv), target="y", protected="g", test_fraction=0)


def test_encode_groups_product_and_reindexing():
    codes = [np.array([0, 0, 1, 2, 2]), np.array([1, 1, 0, 1, 0])]
    g, names, info = encode_groups(codes, [["a", "b", "c"], ["x", "y"]])
    assert names == ["a|y", "b|x", "c|x", "c|y"]
    assert g.tolist() == [0, 0, 1, 3, 2]
    assert info["empty_intersections_dropped"] == 2
    keep = np.array([True, True, False, True, True])
    with pytest.warns(UserWarning, match=r"1 protected group\(s\) have no rows after filtering.*b\|x"):
        g, names, _ = encode_groups(codes, [["a", "b", "c"], ["x", "y"]], keep=keep)
    assert names == ["a|y", "c|x", "c|y"] and g.tolist() == [0, 0, 2, 1]


def test_utkface_shared_root_is_accepted(tmp_path):
    from PIL import Image

    d = tmp_path / "root" / "utkface64"
    d.mkdir(parents=True)
    for k, name in enumerate(["20_0_0_1.jpg.chip.jpg", "21_1_0_2.jpg.chip.jpg", "22_0_1_3.jpg.chip.jpg",
                              "23_1_1_4.jpg.chip.jpg", "24_0_0_5.jpg.chip.jpg", "25_1_1_6.jpg.chip.jpg"]):
        Image.fromarray(np.full((4, 4, 3), 40 * k, np.uint8)).save(d / name, format="JPEG")
    ds = load_dataset("utkface", str(tmp_path / "root"), image_size=4, protected="gender",
                      cache_dir=str(tmp_path / "c"), test_fraction=0.5)
    assert len(ds.train) + len(ds.test) == 6
    shutil.rmtree(d)
    with pytest.raises(FileNotFoundError, match="no UTKFace images found"):
        load_dataset("utkface", str(tmp_path / "root"))
