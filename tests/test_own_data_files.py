"""A researcher's own copy of a dataset, damaged the way real copies are (a twelfth tester's round): CIFAR
pickles with short label lists, float pixels or labels out of range; a CelebA table cut short, with odd values,
odd partition codes or a repeated row; a FairFace CSV with a byte-order mark; UTKFace with copied images, a
16-bit grayscale image or the folder one level too high; channel-first arrays given to prune(). Each reads
right or stops before any training, naming the file and the fix."""
from __future__ import annotations

import numpy as np
import pytest

from fairprune_jax.data import load_dataset
from test_native_datasets import CELEBA_ATTRS, _cifar_rows, _jpeg, _pickle


def _cifar10(tmp_path, *, short=None, labels_of=None, data_of=None):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        rows, _ = _cifar_rows(rng, 8)
        labels = [(i + k) % 10 for k in range(8)]
        name = f"data_batch_{i}"
        _pickle(d / name, {b"labels": (labels_of or {}).get(name, labels[: 5 if name == short else 8]),
                           b"data": (data_of or {}).get(name, rows)})
    rows, _ = _cifar_rows(rng, 10)
    _pickle(d / "test_batch", {b"labels": list(range(7 if short == "test_batch" else 10)), b"data": rows})
    return tmp_path


@pytest.mark.parametrize("short", ["data_batch_3", "test_batch"])
def test_a_cifar_batch_with_fewer_labels_than_images_is_named(tmp_path, short):
    """Before: the labels of every later batch shifted onto other images, without a word (train), or a shape
    error naming no file (test)."""
    with pytest.raises(ValueError, match=f"{short} holds (8|10) images and (5|7) labels"):
        load_dataset("cifar10", str(_cifar10(tmp_path, short=short)))


def test_cifar_float_pixels_and_labels_out_of_range_are_named(tmp_path):
    floats = (np.random.default_rng(0).random((8, 3072))).astype(np.float32)
    with pytest.raises(ValueError, match=r"data_batch_2 holds float32 pixels, values .* to 0.99.*uint8"):
        load_dataset("cifar10", str(_cifar10(tmp_path / "f", data_of={"data_batch_2": floats})))
    with pytest.raises(ValueError, match=r"data_batch_1's labels holds 1 value\(s\) outside 0-9 \(e.g. 10 at row 3"):
        load_dataset("cifar10", str(_cifar10(tmp_path / "l", labels_of={"data_batch_1": [0, 1, 2, 10, 4, 5, 6, 7]})))


def test_cifar100_superclass_groups_need_the_coarse_labels(tmp_path):
    """Before: every row in superclass 0, and a warning about empty groups."""
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        rows, _ = _cifar_rows(rng, 20)
        _pickle(d / split, {b"fine_labels": list(range(20)), b"data": rows})
    assert load_dataset("cifar100", str(tmp_path)).num_classes == 100          # fine labels as groups: fine
    with pytest.raises(ValueError, match="train has no coarse_labels"):
        load_dataset("cifar100", str(tmp_path), protected="coarse_label")


def _celeba(tmp_path, n=12, *, values=None, lines_cut=0, partition=None, repeat=False):
    img = tmp_path / "img_align_celeba"
    img.mkdir(parents=True)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, f in enumerate(files):
        _jpeg(img / f, 20, 24, (20 * i, 0, 0))
    vals = values if values is not None else [["1" if (i + k) % 2 else "-1" for k in range(40)] for i in range(n)]
    rows = [f"{f} " + " ".join(v) for f, v in zip(files, vals)]
    rows = rows[: n - lines_cut] + ([rows[0]] if repeat else [])
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join([str(n), " ".join(CELEBA_ATTRS), *rows]) + "\n")
    part = partition or [0] * 6 + [1] * 3 + [2] * 3
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, part)))
    return str(tmp_path)


def test_celeba_tables_cut_short_repeated_or_oddly_coded_are_named(tmp_path):
    with pytest.raises(ValueError, match="says it lists 12 images and lists 9"):
        load_dataset("celeba", _celeba(tmp_path / "cut", lines_cut=3), image_size=8)
    with pytest.raises(ValueError, match=r"lists 000001.jpg twice"):
        load_dataset("celeba", _celeba(tmp_path / "rep", n=11, repeat=True), image_size=8)
    with pytest.raises(ValueError, match=r"line 4: '000004.jpg 3'.*0 \(train\), 1 \(val\) or 2 \(test\)"):
        load_dataset("celeba", _celeba(tmp_path / "code", partition=[0, 0, 0, 3] + [0] * 2 + [1] * 3 + [2] * 3),
                     image_size=8)
    odd = [["1"] * 40 for _ in range(12)]
    odd[5][3] = "True"
    with pytest.raises(ValueError, match=r"line 8 \(000006.jpg\): attribute value 'True'"):
        load_dataset("celeba", _celeba(tmp_path / "odd", values=odd), image_size=8)
    plus = [["+1" if (i + k) % 2 else "-1" for k in range(40)] for i in range(12)]     # +1 is present
    smiling = CELEBA_ATTRS.index("Smiling")
    ds = load_dataset("celeba", _celeba(tmp_path / "plus", values=plus), target="Smiling", image_size=8)
    assert ds.train.y.tolist() == [int(plus[i][smiling] == "+1") for i in range(6)]


def test_a_fairface_csv_saved_with_a_byte_order_mark_reads(tmp_path):
    races = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]
    for split, n in (("train", 7), ("val", 7)):
        (tmp_path / split).mkdir()
        rows = ["file,age,gender,race,service_test"]
        for i in range(n):
            _jpeg(tmp_path / split / f"{i}.jpg", 12, 12, (0, 10 * i, 0))
            rows.append(f"{split}/{i}.jpg,20-29,{'Male' if i % 2 else 'Female'},{races[i]},True")
        (tmp_path / f"fairface_label_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    assert len(load_dataset("fairface", str(tmp_path), image_size=8).train) == 7


def _faces(d, n=30, start=0):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        _jpeg(d / f"{20 + i % 40}_{i % 2}_{i % 5}_2017011617452{i:04d}.jpg.chip.jpg", 16, 16,
              (i * 7 % 256, i * 13 % 256, i * 29 % 256))


def test_utkface_copies_are_counted_and_dropped_on_request_and_a_nested_folder_is_named(tmp_path):
    import shutil
    d = tmp_path / "utk"
    _faces(d)
    for p in sorted(d.iterdir())[:5]:                    # a merged download: "name (1).jpg"
        shutil.copy(p, p.with_name(p.name.replace(".chip.jpg", ".chip (1).jpg")))
    with pytest.warns(UserWarning, match=r"5 image\(s\) in .* have the same pixels as another.*dedupe=true"):
        ds = load_dataset("utkface", str(d), image_size=8, cache_dir=str(tmp_path / "c"))
    assert ds.meta["duplicate_images"] == 5 and len(ds.train) + len(ds.test) == 35
    with pytest.warns(UserWarning, match="dropped"):
        kept = load_dataset("utkface", str(d), image_size=8, cache_dir=str(tmp_path / "c"), dedupe=True)
    assert len(kept.train) + len(kept.test) == 30 and kept.meta["dropped_duplicates"]
    _faces(tmp_path / "top" / "UTKFace")                 # the archive's own folder, one level down
    with pytest.raises(FileNotFoundError, match=r"top/UTKFace holds UTKFace images: pass --data-dir"):
        load_dataset("utkface", str(tmp_path / "top"), image_size=8, cache_dir=str(tmp_path / "c"))


def test_a_16_bit_grayscale_image_is_scaled_not_clipped(tmp_path):
    from PIL import Image
    from fairprune_jax.data.utkface import _decode_one
    a = np.full((8, 8), 32768, np.uint16)                # mid-grey in 16 bits
    Image.fromarray(a).save(tmp_path / "g.png")
    assert abs(int(_decode_one(str(tmp_path / "g.png"), 8)[0, 0, 0]) - 128) <= 1   # was 255


@pytest.mark.parametrize("shape, fix", [((12, 3, 8, 8), r"x.transpose\(0, 2, 3, 1\)"), ((12, 8, 8), r"x\[..., None\]")])
def test_channel_first_or_channelless_images_get_the_layout_fix(shape, fix):
    from flax import nnx
    import fairprune_jax

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(self.conv(x).mean(axis=(1, 2)))

    x = np.zeros(shape, np.float32)
    y, g = np.arange(12) % 2, np.arange(12) % 2
    with pytest.raises(ValueError, match=fix):
        fairprune_jax.prune(Net(nnx.Rngs(0)), train=(x, y, g), method="magnitude", sparsity=0.5, progress=False)
