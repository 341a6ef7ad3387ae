"""TFDS loaders driven offline by ``tfds.testing.mock_data`` (data_source, array_record; no TensorFlow)."""
from __future__ import annotations

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from fairprune_jax.data import load_dataset  # noqa: E402
from fairprune_jax.data.tfds import CELEBA_ATTRIBUTES  # noqa: E402


def _mock_records(name, split, data_dir, n):
    src = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
    return [src[i] for i in range(n)]


def test_cifar10_classes_are_groups(tmp_path):
    with tfds.testing.mock_data(num_examples=40):
        ds = load_dataset("tfds:cifar10", str(tmp_path))
        recs = _mock_records("cifar10", "train", tmp_path, 40)
    assert ds.num_classes == 10
    assert len(ds.train) == 40 and len(ds.test) == 40
    assert ds.input_shape == (32, 32, 3)
    assert ds.group_attrs == ["class"]
    labels = np.array([r["label"] for r in recs])
    np.testing.assert_array_equal(ds.train.y, labels)
    present = sorted(set(labels.tolist()) | set(ds.test.y.tolist()))
    # group ids are the classes, re-numbered over the classes that occur
    np.testing.assert_array_equal(ds.train.g, np.searchsorted(present, labels))
    assert len(ds.group_names) == len(present)
    np.testing.assert_allclose(ds.train.x[0], recs[0]["image"] / 255.0, atol=1e-6)
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0
    assert len(ds.meta["channel_mean"]) == 3


def test_cifar100_fine_and_coarse_groups(tmp_path):
    with tfds.testing.mock_data(num_examples=200):
        coarse = load_dataset("tfds:cifar100", str(tmp_path), protected="coarse_label", val_fraction=0.25,
                              image_size=16)
        with pytest.warns(UserWarning, match="no rows"):  # 400 mock images miss some of the 100 classes
            fine = load_dataset("tfds:cifar100", str(tmp_path))
        recs = _mock_records("cifar100", "test", tmp_path, 200)
    assert coarse.num_classes == 100 and coarse.group_attrs == ["coarse_label"]
    assert len(coarse.group_names) <= 20
    assert coarse.input_shape == (16, 16, 3)
    assert len(coarse.train) + len(coarse.val) == 200 and len(coarse.val) > 0
    cl = np.array([r["coarse_label"] for r in recs])
    present = sorted(set(cl.tolist()))
    np.testing.assert_array_equal(np.asarray(present)[coarse.test.g], cl)
    np.testing.assert_array_equal(coarse.test.y, [r["label"] for r in recs])
    assert fine.group_attrs == ["class"] and len(fine.group_names) > 20
    with pytest.raises(ValueError, match="valid choices: label, coarse_label"):
        load_dataset("tfds:cifar100", str(tmp_path), protected="superclass")


def test_celeb_a_attributes(tmp_path):
    with tfds.testing.mock_data(num_examples=50):
        ds = load_dataset("tfds:celeb_a", str(tmp_path), image_size=24)
        inter = load_dataset("tfds:celeb_a", str(tmp_path), target="Young", protected="Male,Eyeglasses",
                             image_size=8, normalize=True)
        recs = _mock_records("celeb_a", "train", tmp_path, 50)
    assert ds.class_names == ["not Smiling", "Smiling"]
    assert ds.group_names == ["not Male", "Male"] and ds.group_attrs == ["Male"]
    assert ds.input_shape == (24, 24, 3)
    np.testing.assert_array_equal(ds.train.y, [int(r["attributes"]["Smiling"]) for r in recs])
    np.testing.assert_array_equal(ds.train.g, [int(r["attributes"]["Male"]) for r in recs])
    assert inter.group_attrs == ["Male", "Eyeglasses"]
    assert set(inter.group_names) <= {"not Male|not Eyeglasses", "not Male|Eyeglasses", "Male|not Eyeglasses",
                                      "Male|Eyeglasses"}
    expect = [f"{'' if r['attributes']['Male'] else 'not '}Male|{'' if r['attributes']['Eyeglasses'] else 'not '}"
              f"Eyeglasses" for r in recs]
    assert [inter.group_names[k] for k in inter.train.g] == expect
    assert inter.meta["normalized"] is True
    np.testing.assert_allclose(inter.train.x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    assert len(CELEBA_ATTRIBUTES) == 40


def test_celeb_a_unknown_attribute_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown target attribute 'Smile'.*Smiling"):
        load_dataset("tfds:celeb_a", str(tmp_path), target="Smile")
    with pytest.raises(ValueError, match=r"unknown protected attribute 'Gender'.*5_o_Clock_Shadow.*Young"):
        load_dataset("tfds:celeb_a", str(tmp_path), protected="Gender")


def test_missing_or_unprepared_data_dir_explains_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"no data_dir given.*tfds build cifar10.*--data-dir"):
        load_dataset("tfds:cifar10", None)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*tfds build cifar10"):
        load_dataset("tfds:cifar10", str(tmp_path / "nope"))
    # an existing folder without the prepared dataset (no mock here)
    with pytest.raises(FileNotFoundError, match=r"not available as array_record.*tfds build cifar100 "
                                                r"--file_format=array_record.*--data-dir"):
        load_dataset("tfds:cifar100", str(tmp_path))
