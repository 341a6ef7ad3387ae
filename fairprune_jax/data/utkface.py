"""UTKFace faces with race / gender / age labels (one JPEG per face).

File names are ``[age]_[gender]_[race]_[date&time].jpg.chip.jpg`` with gender
0 = male, 1 = female and race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others.
Labels come from the name (``name.split('_')[:3]``), so the two known quirky
names (a space before ``.jpg``, a missing dot) parse; names that do not parse
are skipped and counted in one warning.

Decoding 20k+ JPEGs takes seconds, so the decoded uint8 arrays are cached in an
``.npz`` keyed by image size and a hash of the file list (names and sizes):
``cache_dir`` or, by default, ``$FAIRPRUNE_CACHE`` or
``~/.cache/fairprune_jax`` (``$XDG_CACHE_HOME`` respected). The first load decodes in a process pool.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from fairprune_jax.core.notices import warn
from fairprune_jax.data.base import (Dataset, carve_validation_indices, check_fraction, default_data_root,
                                     encode_groups, image_splits, parse_attr_list, stratified_split)

RACES = ("White", "Black", "Asian", "Indian", "Others")
GENDERS = ("male", "female")
AGE_BUCKETS = ("0-9", "10-19", "20-39", "40-59", "60+")
TARGETS = ("race", "gender", "age")
PROTECTED = ("race", "gender", "age", "age_years")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1
#: Below this many files the decode runs in-process (a pool costs more than it saves).
SERIAL_DECODE_BELOW = 1500

LAYOUT = ("a folder of face images named [age]_[gender]_[race]_[date&time].jpg.chip.jpg "
          "(e.g. 25_1_2_20170116174525125.jpg.chip.jpg), such as shared/data/utkface64/")


def parse_utkface_name(name: str) -> tuple[int, int, int] | None:
    """``(age, gender, race)`` from a UTKFace file name, or ``None`` if it does not parse."""
    parts = name.split("_")
    if len(parts) < 4:
        return None
    try:
        age, gender, race = (int(p.strip()) for p in parts[:3])
    except ValueError:
        return None
    if not (0 <= age <= 150 and gender in (0, 1) and 0 <= race < len(RACES)):
        return None
    return age, gender, race


def age_bucket(age: np.ndarray | int) -> np.ndarray:
    """Bucket index for ages: 0-9, 10-19, 20-39, 40-59, 60+."""
    return np.digitize(np.asarray(age), [10, 20, 40, 60]).astype(np.int64)


def _decode_one(path: str, size: int, crop: bool = False) -> np.ndarray | None:
    """One image as ``(size, size, 3)`` uint8, None when unreadable; ``crop``: a non-square image is cut to its
    central square first (else it is stretched, which UTKFace's square crops never need)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: let the decoder downscale by 1/2, 1/4, 1/8 when it can
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):    # 16-bit grayscale: PIL's convert clips it at 255
                a = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.round(a / (257.0 if a.max() > 255 else 1.0)).clip(0, 255).astype(np.uint8),
                                     "L")
            im = im.convert("RGB")
            w, h = im.size
            if crop and w != h:
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError):  # PIL's errors for unreadable / truncated files
        return None
    if arr.shape != (size, size, 3):
        return None
    return arr


def _decode_chunk(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    paths, size, *rest = args
    crop = bool(rest[0]) if rest else False
    out = np.zeros((len(paths), size, size, 3), np.uint8)
    ok = np.zeros(len(paths), bool)
    for i, p in enumerate(paths):
        arr = _decode_one(p, size, crop)
        if arr is not None:
            out[i] = arr
            ok[i] = True
    return out, ok


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _decode_files(paths: list[str], size: int, num_workers: int | None = None, *, crop: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize images to ``(n, size, size, 3)`` uint8; ``ok[i]`` is False for unreadable files.

    With several workers, joblib's process pool (loky: safe beside JAX's threads, and it does not re-run the
    caller's script) decodes chunks of the list. Threads were measured slower than one process (UTKFace at
    32 px, 23,705 images, 2 cores: 5.6 s with 2 threads, 4.7 s serial): per image, Python work dominates."""
    workers = _default_workers() if num_workers is None else max(1, int(num_workers))
    if workers == 1 or len(paths) < SERIAL_DECODE_BELOW:
        return _decode_chunk((paths, size, crop))
    from joblib import Parallel, delayed
    chunks = [list(c) for c in np.array_split(np.asarray(paths, dtype=object), 2 * workers) if len(c)]
    results = Parallel(n_jobs=workers, backend="loky")(delayed(_decode_chunk)((c, size, crop)) for c in chunks)
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def _copies(images: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
    """``(index, index of the first image with the same pixels)`` for every decoded image that repeats an
    earlier one (images in file-name order)."""
    import hashlib
    seen: dict[bytes, int] = {}
    out = []
    for i in np.flatnonzero(ok):
        h = hashlib.blake2b(np.ascontiguousarray(images[i]).tobytes(), digest_size=16).digest()
        if h in seen:
            out.append((int(i), seen[h]))
        else:
            seen[h] = int(i)
    return out


def _resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        root = default_data_root()
        d = root / "utkface64"
        if not d.is_dir():
            raise FileNotFoundError(
                f"utkface: no data_dir given and the default {d} does not exist; pass --data-dir pointing to "
                f"{LAYOUT}")
        return d
    d = Path(data_dir)
    if not d.exists():
        raise FileNotFoundError(f"utkface: data_dir {d} does not exist; expected {LAYOUT}")
    if not d.is_dir():
        raise NotADirectoryError(f"utkface: data_dir {d} is not a directory; expected {LAYOUT}")
    return d


def _list_images(d: Path) -> list[os.DirEntry]:
    with os.scandir(d) as it:
        return [e for e in it if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES)
                and e.is_file()]


def _shown(path: Path) -> str:
    """The path as recorded in results: the home folder abbreviated to ``~`` (results travel between machines)."""
    home = str(Path.home())
    p = str(path)
    return "~" + p[len(home):] if home not in ("", "/") and p.startswith(home + os.sep) else p


def _resolve_cache_dir(cache_dir: str | os.PathLike | None, data_dir: Path) -> Path | None:
    candidates = [Path(cache_dir)] if cache_dir is not None else []
    if cache_dir is None:  # the user's cache, never the (possibly shared, read-only) data folder
        env = os.environ.get("FAIRPRUNE_CACHE") or os.environ.get("XDG_CACHE_HOME")
        base = Path(env) if env else Path.home() / ".cache"
        candidates.append(base / "fairprune_jax" if not os.environ.get("FAIRPRUNE_CACHE") else base)
    for c in candidates:
        try:
            c.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(c, os.W_OK):
            return c
    if cache_dir is not None:
        raise PermissionError(f"utkface: cache_dir {cache_dir} cannot be created or written")
    warn("utkface: no writable cache directory; decoded images will not be cached")
    return None


def _load_or_decode(d: Path, names: list[str], sizes: list[int], image_size: int, cache_dir: Path | None,
                    num_workers: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}\n".encode())
    for n, s in zip(names, sizes):
        h.update(f"{n}\t{s}\n".encode())
    key = h.hexdigest()[:16]
    info: dict = {"cache_key": key, "cache_hit": False, "cache_file": None}
    path = cache_dir / f"utkface_{image_size}px_{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                images, ok, cached_names = z["images"], z["ok"], z["names"]
            if list(cached_names) == names and images.shape == (len(names), image_size, image_size, 3):
                info.update(cache_hit=True, cache_file=_shown(path))
                return images, ok, info
        except (OSError, ValueError, KeyError) as err:
            warn(f"utkface: ignoring unreadable cache file {path} ({err!r})")
    t0 = time.perf_counter()
    images, ok = _decode_files([str(d / n) for n in names], image_size, num_workers)
    info["decode_seconds"] = round(time.perf_counter() - t0, 3)
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, ok=ok, names=np.asarray(names))
            os.replace(tmp, path)
            info["cache_file"] = _shown(path)
        except OSError as err:
            warn(f"utkface: could not write cache file {path} ({err!r})")
            tmp.unlink(missing_ok=True)
    return images, ok, info


def load_utkface(data_dir: str | os.PathLike | None = None, *, target: str = "race", protected: str = "race",
                 image_size: int = 32, test_fraction: float = 0.2, val_fraction: float | None = None,
                 seed: int = 0, cache_dir: str | os.PathLike | None = None, normalize: bool = False,
                 num_workers: int | None = None, dedupe: bool = False) -> Dataset:
    """Load UTKFace as float32 NHWC images in [0, 1].

    ``target``: ``race`` (5 classes), ``gender`` (2) or ``age`` (buckets 0-9,
    10-19, 20-39, 40-59, 60+). ``protected``: one of race, gender, age,
    age_years (exact age) or a comma-separated intersection such as
    ``"race,gender"`` (groups named ``"White|female"``; empty combinations are
    dropped). The test split (``test_fraction``) and the optional validation
    split are seeded and stratified by group and label. Per-channel mean/std of
    the train split are in ``meta``; ``normalize=True`` applies them. Images with
    the same pixels as another (UTKFace holds some; a merged download holds many)
    are counted in a warning and ``meta["duplicate_images"]``; ``dedupe=True``
    drops them, keeping the first by file name.
    """
    ds_name = "utkface"
    if target not in TARGETS:
        raise ValueError(f"utkface: unknown target {target!r}; valid choices: {', '.join(TARGETS)}")
    attrs = parse_attr_list(protected, PROTECTED, what="protected attribute", dataset=ds_name)
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"utkface: image_size must be a positive integer; got {image_size}")
    test_fraction = check_fraction(test_fraction, "test_fraction")
    d = _resolve_dir(data_dir)

    entries = _list_images(d)
    if not entries and (d / "utkface64").is_dir():  # data_dir is the shared data root
        d = d / "utkface64"
        entries = _list_images(d)
    parsed: list[tuple[str, int, tuple[int, int, int]]] = []
    bad_names: list[str] = []
    for e in entries:
        p = parse_utkface_name(e.name)
        if p is None:
            bad_names.append(e.name)
        else:
            parsed.append((e.name, e.stat().st_size, p))
    if bad_names:
        shown = ", ".join(repr(b) for b in sorted(bad_names)[:5])
        warn(f"utkface: skipped {len(bad_names)} file(s) in {d} whose names do not parse as "
             f"[age]_[gender]_[race]_[date&time].jpg: {shown}{' ...' if len(bad_names) > 5 else ''}")
    if not parsed:
        inside = [s for s in sorted(d.iterdir()) if s.is_dir() and not s.name.startswith(".")
                  and any(parse_utkface_name(e.name) for e in _list_images(s)[:50])]
        hint = f"; {inside[0]} holds UTKFace images: pass --data-dir {inside[0]}" if inside else ""
        raise FileNotFoundError(f"utkface: no UTKFace images found in {d} ({len(entries)} image file(s), "
                                f"none with a parsable name){hint}; expected {LAYOUT}")
    parsed.sort()
    names = [p[0] for p in parsed]
    labels = np.asarray([p[2] for p in parsed], np.int64).reshape(-1, 3)
    age, gender, race = labels[:, 0], labels[:, 1], labels[:, 2]

    cache = _resolve_cache_dir(cache_dir, d)
    t0 = time.perf_counter()
    images, ok, cache_info = _load_or_decode(d, names, [p[1] for p in parsed], image_size, cache, num_workers)
    load_seconds = round(time.perf_counter() - t0, 3)
    corrupt = [n for n, good in zip(names, ok) if not good]
    if corrupt:
        shown = ", ".join(repr(c) for c in corrupt[:5])
        warn(f"utkface: skipped {len(corrupt)} image file(s) that could not be decoded: "
             f"{shown}{' ...' if len(corrupt) > 5 else ''}")
    if not ok.any():
        raise ValueError(f"utkface: none of the {len(names)} images in {d} could be decoded")
    copies = _copies(images, ok)
    if copies:
        first = {c: f for c, f in copies}
        shown = ", ".join(f"{names[c]!r} = {names[first[c]]!r}" for c, _ in copies[:3])
        if dedupe:
            ok = ok.copy()
            ok[[c for c, _ in copies]] = False
        warn(f"utkface: {len(copies)} image(s) in {d} have the same pixels as another ({shown}"
             f"{' ...' if len(copies) > 3 else ''}): "
             + ("dropped (dedupe=true), the first by name kept" if dedupe else
                "a copy can land in both train and test; --data-opt dedupe=true drops them (the first by name "
                "is kept)"))

    ages_present = sorted(set(age.tolist()))
    attr_codes = {
        "race": (race, list(RACES)),
        "gender": (gender, list(GENDERS)),
        "age": (age_bucket(age), list(AGE_BUCKETS)),
        "age_years": (np.searchsorted(ages_present, age), [str(a) for a in ages_present]),
    }
    g, group_names, group_info = encode_groups([attr_codes[a][0] for a in attrs],
                                               [attr_codes[a][1] for a in attrs], keep=ok, dataset=ds_name)
    y_all, class_names = attr_codes[target]
    y = np.asarray(y_all)[ok].astype(np.int32)
    if not ok.all():
        images = images[ok]

    train_idx, test_idx = stratified_split(y, g, test_fraction, seed=seed)
    train_idx, val_idx = carve_validation_indices(train_idx, y, g, val_fraction, seed)
    parts = {"train": train_idx, "test": test_idx}
    if val_idx is not None:
        parts["val"] = val_idx
    splits, img_meta = image_splits({k: (images[i], y[i], g[i]) for k, i in parts.items()}, normalize=normalize)

    meta = {
        "source": str(d), "image_size": image_size, "target": target, "protected": attrs,
        "num_files": len(entries), "num_images": int(ok.sum()),
        "skipped_unparsable_names": len(bad_names), "skipped_corrupt_images": len(corrupt),
        "duplicate_images": len(copies), "dropped_duplicates": bool(dedupe and copies),
        "test_fraction": test_fraction, "val_fraction": val_fraction, "split_seed": seed,
        "load_seconds": load_seconds, **cache_info, **group_info, **img_meta,
    }
    return Dataset(name=ds_name, train=splits["train"], test=splits["test"], val=splits.get("val"),
                   group_names=group_names, group_attrs=attrs, class_names=list(class_names), meta=meta)
