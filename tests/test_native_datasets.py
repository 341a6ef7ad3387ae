"""CIFAR-10 / CIFAR-100 / CelebA / FairFace read from files written here in their distributed formats (python
pickles; aligned JPEGs with list_attr_celeba.txt and list_eval_partition.txt; FairFace's label CSVs and image
folders): shapes, labels, groups and splits as the files say, and a missing file names the download layout."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from fairprune_jax.data import DATASETS, load_dataset

CELEBA_ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
                "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
                "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
                "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
                "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
                "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
                "Wearing_Necktie", "Young"]


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_rows(rng, n):
    """n images as CIFAR rows (R plane, G plane, B plane) and the NHWC images they encode."""
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return images.transpose(0, 3, 1, 2).reshape(n, 3072), images


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    truth = {"train": [], "test": []}
    for i in range(1, 6):
        rows, imgs = _cifar_rows(rng, 8)
        labels = [(i + k) % 10 for k in range(8)]
        _pickle(d / f"data_batch_{i}", {b"batch_label": b"training batch", b"labels": labels, b"data": rows})
        truth["train"].append((imgs, labels))
    rows, imgs = _cifar_rows(rng, 10)
    _pickle(d / "test_batch", {b"labels": list(range(10)), b"data": rows})
    truth["test"] = (imgs, list(range(10)))
    _pickle(d / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                                                  b"frog", b"horse", b"ship", b"truck"]})
    return tmp_path, truth


def test_cifar10_pickles_give_the_images_labels_and_class_groups(cifar10_dir):
    root, truth = cifar10_dir
    ds = load_dataset("cifar10", str(root))                       # the folder containing cifar-10-batches-py
    assert ds.class_names[:2] == ["airplane", "automobile"] and ds.num_groups == 10
    assert len(ds.train) == 40 and len(ds.test) == 10 and ds.input_shape == (32, 32, 3)
    want = truth["test"][0].astype(np.float32) / 255.0
    np.testing.assert_allclose(ds.test.x, want, atol=1e-6)        # plane order decoded right
    assert ds.test.y.tolist() == list(range(10))
    assert [ds.group_names[g] for g in ds.test.g] == ds.class_names       # group = class
    small = load_dataset("cifar10", str(root / "cifar-10-batches-py"), image_size=16, max_examples=12,
                         val_fraction=0.25)
    assert small.input_shape == (16, 16, 3) and len(small.train) + len(small.val) == 12 and len(small.test) == 10


@pytest.mark.filterwarnings("ignore:.*no rows after filtering")   # 30 of 100 classes in these tiny files
def test_cifar100_groups_are_classes_or_superclasses(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n in (("train", 30), ("test", 20)):
        rows, _ = _cifar_rows(rng, n)
        fine = [k % 100 for k in range(n)]
        _pickle(d / split, {b"fine_labels": fine, b"coarse_labels": [f % 20 for f in fine], b"data": rows})
    _pickle(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    fine = load_dataset("cifar100", str(tmp_path))
    assert fine.num_classes == 100 and fine.train.y[:3].tolist() == [0, 1, 2]
    coarse = load_dataset("cifar100", str(tmp_path), protected="coarse_label")
    assert coarse.num_groups == 20 and coarse.group_names[0] == "c0"
    assert [coarse.group_names[g] for g in coarse.train.g[:3]] == ["c0", "c1", "c2"]
    with pytest.raises(ValueError, match="coarse_label"):
        load_dataset("cifar100", str(tmp_path), protected="superclass")


def _jpeg(path, w, h, color):
    from PIL import Image
    Image.new("RGB", (w, h), color).save(path, quality=95)


def test_celeba_files_give_the_official_partition_and_attribute_groups(tmp_path):
    img = tmp_path / "img_align_celeba"
    img.mkdir()
    n = 12
    rng = np.random.default_rng(2)
    values = rng.choice([-1, 1], size=(n, 40))
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, f in enumerate(files):
        _jpeg(img / f, 178, 218, (20 * i, 0, 0))                   # CelebA's aligned size: not square
    lines = [str(n), " ".join(CELEBA_ATTRS)] + [f"{f} " + " ".join(f"{v:2d}" for v in row)
                                                for f, row in zip(files, values)]
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    partition = [0] * 6 + [1] * 3 + [2] * 3
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, partition)))
    ds = load_dataset("celeba", str(tmp_path), target="Smiling", protected="Male,Young", image_size=16)
    smiling, male = CELEBA_ATTRS.index("Smiling"), CELEBA_ATTRS.index("Male")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 3)
    assert ds.train.y.tolist() == (values[:6, smiling] == 1).astype(int).tolist()
    assert ds.class_names == ["not Smiling", "Smiling"] and ds.input_shape == (16, 16, 3)
    names = [ds.group_names[g] for g in ds.test.g]
    assert [nm.split("|")[0] == "Male" for nm in names] == (values[9:, male] == 1).tolist()
    # the red channel of image i is 20 * i: row order kept
    assert np.allclose(ds.train.x[:, 8, 8, 0] * 255, [20 * i for i in range(6)], atol=2)
    carved = load_dataset("celeba", str(tmp_path), target="Smiling", protected="Male", image_size=8,
                          val_fraction=0.5, seed=1)
    assert len(carved.train) + len(carved.val) == 6 and "instead of the official val" in carved.meta["split"]
    with pytest.raises(ValueError, match="unknown target attribute 'Smile'"):
        load_dataset("celeba", str(tmp_path), target="Smile")
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt is missing.*mmlab"):
        load_dataset("celeba", str(tmp_path))


def test_fairface_csvs_and_folders(tmp_path):
    races = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
    for split, n in (("train", 14), ("val", 7)):
        (tmp_path / split).mkdir()
        rows = ["file,age,gender,race,service_test"]
        for i in range(n):
            f = f"{split}/{i + 1}.jpg"
            _jpeg(tmp_path / f, 40, 40, (0, 10 * i, 0))
            rows.append(f"{f},20-29,{'Male' if i % 2 else 'Female'},{races[i % 7]},True")
        (tmp_path / f"fairface_label_{split}.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset("fairface", str(tmp_path), protected="race,gender", image_size=8)
    assert len(ds.train) == 14 and len(ds.test) == 7 and ds.val is None
    assert ds.class_names == ["Male", "Female"] and ds.test.y.tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert [ds.group_names[g] for g in ds.test.g][:2] == ["White|Female", "Black|Male"]
    race = load_dataset("fairface", str(tmp_path), target="race", protected="gender")
    assert race.num_classes == 7 and race.num_groups == 2
    held = load_dataset("fairface", str(tmp_path), protected="gender", val_fraction=0.5)
    assert held.val is not None and len(held.train) + len(held.val) == 14
    (tmp_path / "val" / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="cannot be read.*val/3.jpg"):
        load_dataset("fairface", str(tmp_path))


@pytest.mark.parametrize("name, layout", [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python"),
                                          ("celeba", "list_attr_celeba.txt"), ("fairface", "joojs/fairface")])
def test_a_missing_dataset_names_where_to_get_it(tmp_path, name, layout):
    assert name in DATASETS
    with pytest.raises(FileNotFoundError, match=layout.replace(".", r"\.")):
        load_dataset(name, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no --data-dir"):
        load_dataset(name, None)


def test_fairprune_run_on_cifar10_files(cifar10_dir, tmp_path):
    """The CLI reads the native files through the same registry a user points --data-dir at."""
    import json
    from fairprune_jax.running.cli import main
    root, _ = cifar10_dir
    out = tmp_path / "run"
    assert main(["run", "--dataset", "cifar10", "--data-dir", str(root), "--method", "magnitude", "--epochs", "1",
                 "--batch-size", "8", "--sparsity", "0.5", "--model-opt", "channels=4,8", "--no-progress",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "cifar10" and res["sizes"]["train"] == 40 and res["groups"]["num_groups"] == 10


def test_mobilenet_v2_is_torchvisions_and_prunes_like_the_papers():
    """MobileNet-V2 (Balancing Act's UTKFace model): at width 1 with 1000 classes it has torchvision's
    3,504,872 parameters; pruned (depthwise kernels included) to the target with the first conv and the last
    layer dense, as the authors' code keeps them (src/configs/utkface/sparse_imp.py:31-32; here the template of
    --exclude-first / --exclude-last read off the forward order, and one-shot magnitude masks). A run on it goes
    end to end in tests/test_paper_settings.py (ceag's first steps on the UTKFace config), so no training is
    compiled here."""
    import jax
    from fairprune_jax.models import build_model, layer_order
    from fairprune_jax.sparsity import masks as M, scores as S
    _, params, _ = build_model("mobilenet_v2", (224, 224, 3), 1000)
    assert sum(x.size for x in jax.tree.leaves(params)) == 3_504_872
    fm, params, state = build_model("mobilenet_v2", (8, 8, 3), 10, width=0.25)
    tmpl = M.prunable_template(params, layer_order=layer_order(fm, params, state), exclude_first=True,
                               exclude_last=True)
    masks = M.masks_from_scores(S.magnitude(params, tmpl), tmpl, 0.8)
    layers = {n: 1.0 - float(np.mean(np.asarray(m))) for n, m in M.named_leaves(masks)}   # the pruned layers
    assert "stem/kernel" not in layers and "head/kernel" not in layers and "last/kernel" in layers
    assert all(v > 0.75 for v in layers.values()) and "blocks/3/depthwise/kernel" in layers


@pytest.mark.parametrize("name,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_imagenet_resnets_are_torchvisions(name, count):
    """ResNet-18 / 34 (FairFace's and FairGRAPE's models): torchvision's parameter counts at 1000 classes; the
    CIFAR stem keeps a 32 px image at full size through the first stage."""
    import jax
    from fairprune_jax.models import build_model
    _, params, _ = build_model(name, (224, 224, 3), 1000)
    assert sum(x.size for x in jax.tree.leaves(params)) == count
    _, small, _ = build_model(name, (32, 32, 3), 10, stem="cifar")
    assert small["stem"]["kernel"].shape == (3, 3, 3, 64)
    with pytest.raises(ValueError, match="stem"):
        build_model(name, (32, 32, 3), 10, stem="tiny")
