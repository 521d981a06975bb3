"""CIFAR-10, CIFAR-100 or any image-folder data set of square RGB images into memory, split,
and batched.

Sources (``data.dataset``, the table DATASETS), found from a data folder or archive:
  * torchvision's own format: ``<dir>/cifar-10-batches-py`` or ``<dir>/cifar-100-python``
    (what ``download=True`` makes; CIFAR-100 with its 100 fine or 20 coarse labels);
  * an image-folder tree ``train/<class>/*``, ``test/<class>/*`` (JPEG or PNG; classes from
    the folder names, in sorted order), as a folder or as a .tar / .tar.gz archive of one;
  * synthetic shapes (``dataset = "synthetic"``), for tests.

Decoding happens once; the uint8 arrays are cached under <cache>/data, keyed by the source's
path, sizes and modification times (and the size policy), so a changed source is decoded
again. Every image is brought to one square size by the declared policy (``data.image_size``,
``data.resize``: refuse, stretch or center_crop, with PIL's bilinear filter) and converted to
RGB; what was resized or converted is said once, never done silently.

The loader keeps the whole split as a uint8 tensor on the device and augments whole batches
with tensor ops (random crop from a zero-padded copy, horizontal flip), the way airbench does,
instead of one PIL call per image. Extra per-image planes (IG maps) are cropped and flipped
with the same offsets as their image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import typing
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from kdig_study import synthetic
from kdig_study.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, DataConfig, DatasetName
from kdig_study.errors import KdigError
from kdig_study.paths import atomic_write, cache_dir, locked
from kdig_study.seeds import derive_seed

_CACHE_VERSION = 1
_IMAGE_EXT = (".jpg", ".jpeg", ".png")
_ARCHIVE_EXT = (".tar", ".tar.gz", ".tgz")
DEFAULT_DATA_DIRS: tuple[str, ...] = ("data", "../shared/data")



@dataclass(frozen=True)
class DatasetKind:
    """A data set kind: what it is called, how many classes it must have (None: any of two
    or more), and its torchvision folder (None: image folders only)."""

    title: str
    classes: int | None
    torchvision_dir: str | None = None
    marker: str = ""  # a file inside the torchvision folder
    torchvision_class: str = ""
    coarse_classes: int | None = None  # the superclass labels' count, where there are some


DATASETS: dict[str, DatasetKind] = {
    "cifar10": DatasetKind("CIFAR-10", 10, "cifar-10-batches-py", "data_batch_1", "CIFAR10"),
    "cifar100": DatasetKind("CIFAR-100", 100, "cifar-100-python", "train", "CIFAR100", 20),
    "folder": DatasetKind("an image-folder data set", None),
}
assert set(DATASETS) | {"synthetic"} == set(typing.get_args(DatasetName))


def _coarse(cfg: DataConfig) -> bool:
    """The superclass labels asked for (CIFAR-100's 20)."""
    return DATASETS[cfg.dataset].coarse_classes is not None and cfg.cifar100_labels == "coarse"


def how_to_get(dataset: str) -> str:
    kind = DATASETS[dataset]
    tree = ("bring an image-folder tree train/<class>/*.jpg, test/<class>/*.jpg (as a folder "
            "or .tar.gz)")
    if kind.torchvision_class:
        tree = (f"get {kind.title} with `python -c \"import torchvision; torchvision.datasets."
                f"{kind.torchvision_class}('data', download=True)\"` on a machine with "
                f"internet (or {tree})")
    return f"{tree}, then point to it with --data-dir DIR or KDIG_DATA=DIR"




@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # [N, 3, S, S] uint8, S the data set's image size
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DecodedDataset:
    """A decoded data set: its training pool and test split."""

    train: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    fingerprint: str  # hash of the decoded pixels and labels
    origin: str  # where it came from, for reports


@dataclass(frozen=True)
class DataBundle:
    """The splits one study uses. ``train`` is stored in stratified order, so its first n
    images are a class-balanced subset (:meth:`train_subset`)."""

    train: ImageSet
    train_index: torch.Tensor  # [N_train] index of each training image in the source's pool
    val: ImageSet
    test: ImageSet
    classes: tuple[str, ...]
    mean: tuple[float, float, float]  # per channel, of the training split, on [0, 1]
    std: tuple[float, float, float]
    fingerprint: str  # source fingerprint + split settings
    origin: str
    pad: int = 4  # training augmentation: random-crop padding
    flip: bool = True  # training augmentation: horizontal flip

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def describe(self) -> str:
        """E.g. "48,000 training images of 10 classes at 32 px (2,000 validation, 10,000
        test) from archive:../shared/data/cifar10-jpg.tar.gz"."""
        return (f"{len(self.train):,} training images of {len(self.classes)} classes at "
                f"{self.image_size} px ({len(self.val):,} validation, {len(self.test):,} "
                f"test) from {self.origin}")

    def train_subset(self, n: int) -> tuple[ImageSet, torch.Tensor]:
        """The first ``n`` training images (0: all) and their indices in the source pool."""
        if n == 0 or n >= len(self.train):
            return self.train, self.train_index
        return self.take_train(torch.arange(n))

    def take_train(self, rows: torch.Tensor) -> tuple[ImageSet, torch.Tensor]:
        return self.train.take(rows), self.train_index[rows]


# ---------------------------------------------------------------------------------------------
# Finding and decoding the source


def resolve_data_path(cfg: DataConfig, flag: str | None) -> Path:
    """--data-dir, then $KDIG_DATA, then the study file's data.path, then the default folders."""
    for given, what in ((flag, "--data-dir"), (os.environ.get("KDIG_DATA"), "KDIG_DATA"),
                        (cfg.path or None, "data.path in the study file")):
        if given:
            path = Path(given).expanduser()
            if not path.exists():
                raise KdigError(f"data folder {path} (from {what}) does not exist; "
                                f"{how_to_get(cfg.dataset)}")
            return path
    for default in DEFAULT_DATA_DIRS:
        path = Path(default)
        if path.exists() and _detect(path, cfg.dataset, strict=False) is not None:
            return path
    raise KdigError(f"no {DATASETS[cfg.dataset].title} found (looked in "
                    f"{', '.join(DEFAULT_DATA_DIRS)}); {how_to_get(cfg.dataset)}")


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_ARCHIVE_EXT)


def _detect(path: Path, dataset: str, strict: bool = True) -> tuple[str, Path] | None:
    """('torchvision' | 'folder' | 'archive', the path to read) or None / an error."""
    kind = DATASETS[dataset]
    if _is_archive(path):
        return "archive", path
    if path.is_dir():
        tv, marker = kind.torchvision_dir, kind.marker
        if tv and (path / tv / marker).is_file():
            return "torchvision", path
        if tv and path.name == tv and (path / marker).is_file():
            return "torchvision", path.parent
        if (path / "train").is_dir() and (path / "test").is_dir():
            return "folder", path
        archives = sorted(p for p in path.iterdir() if _is_archive(p))
        if len(archives) == 1:
            return "archive", archives[0]
        if len(archives) > 1 and strict:
            names = ", ".join(p.name for p in archives)
            raise KdigError(f"data folder {path} holds several archives ({names}); point "
                            f"--data-dir at one of them")
    if strict:
        expected = f"{kind.torchvision_dir}/, " if kind.torchvision_dir else ""
        raise KdigError(f"{path} holds no {kind.title}: expected {expected}train/ and test/ "
                        f"folders, or a .tar/.tar.gz of them; {how_to_get(dataset)}")
    return None


def _stat_signature(kind: str, path: Path, dataset: str) -> list[tuple[str, int, int]]:
    if kind == "archive":
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    tv = DATASETS[dataset].torchvision_dir
    root = path / tv if kind == "torchvision" and tv else path
    sig = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            sig.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(sig)


@dataclass
class _Decoder:
    """Decodes images to HWC uint8 RGB at one square size, by the declared policy
    (``data.image_size``, ``data.resize``), and remembers what it converted and resized, for
    the caller to say once."""

    size: int  # 0 until the first image sets it (data.image_size = 0: the images' own size)
    policy: str  # refuse | stretch | center_crop
    converted: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    first: str = ""  # the image that set the size, for the refusal

    def decode(self, data: bytes | Path, where: str) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                if im.mode != "RGB":
                    self.converted.append(f"{where} ({im.mode})")
                return self.fit(im.convert("RGB"), where)
        except KdigError:
            raise
        except Exception as e:  # PIL raises several types for bad files
            raise KdigError(f"cannot decode image {where}: {e}") from None

    def fit(self, im: Image.Image, where: str) -> np.ndarray:
        """``im`` (RGB) at the data set's size: as it is, resized, or refused in one line."""
        w, h = im.size
        if not self.size and w == h:
            self._adopt(w, where)
        if (w, h) == (self.size, self.size):
            return np.asarray(im)
        if self.policy == "refuse":
            have = "images must be square"
            if self.first:
                have = f"the first image, {self.first}, is {self.size}x{self.size}"
            elif self.size:
                have = f"data.image_size = {self.size}"
            raise KdigError(f"image {where} is {w}x{h}, but {have}; set data.resize = "
                            f"\"stretch\" or \"center_crop\" with data.image_size = N to bring "
                            f"every image to N x N px (or resize the files)")
        self.resized.append(f"{where} ({w}x{h})")
        size = (self.size, self.size)
        out = im.resize(size, Image.Resampling.BILINEAR) if self.policy == "stretch" else \
            ImageOps.fit(im, size, Image.Resampling.BILINEAR)
        return np.asarray(out)

    def _adopt(self, size: int, where: str) -> None:
        """The images' own size becomes the data set's (data.image_size = 0)."""
        if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise KdigError(f"image {where} is {size}x{size}; allowed: {MIN_IMAGE_SIZE} to "
                            f"{MAX_IMAGE_SIZE} px: set data.image_size = N in that range "
                            f"with data.resize = \"stretch\"")
        self.size, self.first = size, self.first or where

    def fit_array(self, images: np.ndarray, where: str) -> np.ndarray:
        """NHWC uint8 images decoded by another reader (torchvision's), fitted alike."""
        h, w = images.shape[1:3]
        if h == w and self.size in (0, h):
            self._adopt(h, where)
            return images
        return np.stack([self.fit(Image.fromarray(a), f"{where}[{i}]")
                         for i, a in enumerate(images)])

    def say(self) -> None:
        if self.converted:
            print(f"converted {len(self.converted)} image(s) that were not RGB to RGB (e.g. "
                  f"{self.converted[0]})", flush=True)
        if self.resized:
            print(f"resized {len(self.resized)} image(s) to {self.size}x{self.size} px by "
                  f"data.resize = {self.policy!r} (e.g. {self.resized[0]})", flush=True)


def _assemble(items: list[tuple[str, str, str, np.ndarray]], where: Path
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """items: (split, class, name, HWC image) -> NCHW arrays in (class, name) order."""
    classes = {s: sorted({c for sp, c, _, _ in items if sp == s}) for s in ("train", "test")}
    if not classes["train"] or not classes["test"]:
        raise KdigError(f"{where}: needs images under both train/<class>/ and test/<class>/")
    if classes["train"] != classes["test"]:
        raise KdigError(f"{where}: train/ and test/ have different class folders: "
                        f"{classes['train']} vs {classes['test']}")
    label_of = {c: i for i, c in enumerate(classes["train"])}
    out = []
    for split in ("train", "test"):
        rows = sorted((label_of[c], n, a) for s, c, n, a in items if s == split)
        x = np.stack([a for _, _, a in rows]).transpose(0, 3, 1, 2)
        y = np.array([lab for lab, _, _ in rows], dtype=np.int64)
        out += [np.ascontiguousarray(x), y]
    return out[0], out[1], out[2], out[3], tuple(classes["train"])


def _split_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('train'|'test', class) for .../train/<class>/<file>, else None."""
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[-3], parts[-2]
    return None


def _image_file(name: str, where: str) -> bool:
    """Whether a file in a class folder is an image to read; a hidden file (.DS_Store) is
    skipped, any other file is refused in one line (it was skipped without a word)."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("."):
        return False
    if not base.lower().endswith(_IMAGE_EXT):
        raise KdigError(f"{where}: not an image; a class folder holds images only (allowed: "
                        f"{', '.join(_IMAGE_EXT)}); move the file out")
    return True


def _read_folder(root: Path, cfg: DataConfig, progress: bool, decoder: _Decoder) -> tuple:
    files = []
    for split in ("train", "test"):
        for p in sorted((root / split).rglob("*")):
            if p.is_file() and _split_class(p.relative_to(root).parts) and \
                    _image_file(p.name, str(p)):
                files.append(p)
    items = []
    for p in tqdm(files, desc=f"decoding {root}", unit="img", mininterval=1.0,
                  disable=not progress):
        split, cls = _split_class(p.relative_to(root).parts)  # type: ignore[misc]
        items.append((split, cls, p.name, decoder.decode(p, str(p))))
    return _assemble(items, root)


def _read_archive(path: Path, cfg: DataConfig, progress: bool, decoder: _Decoder) -> tuple:
    items = []
    try:
        with tarfile.open(path, "r:*") as tar, tqdm(desc=f"decoding {path.name}", unit="img",
                                                    mininterval=1.0, disable=not progress) as bar:
            for member in tar:
                sc = _split_class(Path(member.name).parts)
                if not member.isfile() or sc is None or \
                        not _image_file(member.name, f"{path}:{member.name}"):
                    continue
                f = tar.extractfile(member)
                assert f is not None  # a regular file always has contents
                items.append((sc[0], sc[1], Path(member.name).name,
                              decoder.decode(f.read(), f"{path}:{member.name}")))
                bar.update()
    except (tarfile.TarError, EOFError, OSError) as e:
        detail = " ".join(str(e).split())  # tarfile's message spans several lines
        raise KdigError(f"cannot read archive {path}: {detail}") from None
    return _assemble(items, path)


def _read_torchvision(root: Path, cfg: DataConfig, progress: bool, decoder: _Decoder
                      ) -> tuple:
    import torchvision.datasets

    kind = DATASETS[cfg.dataset]
    cls = getattr(torchvision.datasets, kind.torchvision_class)
    try:
        sets = [cls(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError as e:
        raise KdigError(f"{root}/{kind.torchvision_dir} is incomplete or corrupt ({e}); "
                        f"{how_to_get(cfg.dataset)}") from None
    arrays = []
    for ds, split in zip(sets, ("train", "test"), strict=True):
        fitted = decoder.fit_array(ds.data, f"{root / kind.torchvision_dir} {split}")
        arrays.append(np.ascontiguousarray(fitted.transpose(0, 3, 1, 2)))
        arrays.append(np.asarray(ds.targets, dtype=np.int64))
    classes = tuple(sets[0].classes)
    if _coarse(cfg):
        arrays[1], arrays[3], classes = _cifar100_coarse(root / kind.torchvision_dir)
    return arrays[0], arrays[1], arrays[2], arrays[3], classes


def _unpickle(path: Path) -> dict[str, typing.Any]:
    # torchvision reads these files the same way (the format is Python pickles)
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar100_coarse(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CIFAR-100's 20 superclass labels of the training and test files (torchvision's
    reader keeps the fine ones only), in the files' order as torchvision reads them, and
    their names."""
    train, test = (np.asarray(_unpickle(folder / name)["coarse_labels"], dtype=np.int64)
                   for name in ("train", "test"))
    return train, test, tuple(_unpickle(folder / "meta")["coarse_label_names"])


def _content_hash(arrays: list[np.ndarray], classes: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    h.update(json.dumps(classes).encode())
    return h.hexdigest()


def load_source(cfg: DataConfig, data_dir: str | None = None, progress: bool = True
                ) -> DecodedDataset:
    """Decode the data set once (cached as uint8 arrays) and return it."""
    if cfg.dataset == "synthetic":
        size = cfg.image_size or 32
        tx, ty = synthetic.generate(cfg.synthetic_train, seed=1, size=size)
        sx, sy = synthetic.generate(cfg.synthetic_test, seed=2, size=size)
        fp = _content_hash([tx.numpy(), ty.numpy(), sx.numpy(), sy.numpy()], synthetic.CLASSES)
        return DecodedDataset(ImageSet(tx, ty), ImageSet(sx, sy), synthetic.CLASSES, fp,
                              "synthetic")
    path = resolve_data_path(cfg, data_dir)
    kind, target = _detect(path, cfg.dataset)  # type: ignore[misc]
    labels = [cfg.cifar100_labels] if DATASETS[cfg.dataset].coarse_classes else []
    # (the caches made before other data sets and sizes keep their key)
    sizing = [cfg.image_size, cfg.resize] if (cfg.image_size, cfg.resize) != (0, "refuse") \
        else []
    key = hashlib.sha256(json.dumps(
        [_CACHE_VERSION, kind, str(target.resolve()),
         _stat_signature(kind, target, cfg.dataset), *labels, *sizing]).encode()
    ).hexdigest()[:20]
    cache = cache_dir() / "data" / f"{cfg.dataset}-{key}.npz"
    with locked(cache):
        arrays = _read_decoded(cache)
        if arrays is None and cache.is_file():
            print(f"data cache {cache} is unreadable; decoding the data again", flush=True)
            cache.unlink()
        if arrays is None:
            reader: Callable[[Path, DataConfig, bool, _Decoder], tuple] = {
                "archive": _read_archive, "folder": _read_folder,
                "torchvision": _read_torchvision}[kind]
            decoder = _Decoder(cfg.image_size, cfg.resize)
            tx, ty, sx, sy, classes = reader(target, cfg, progress, decoder)
            decoder.say()
            fp = _content_hash([tx, ty, sx, sy], classes)

            def write(tmp: Path) -> None:
                with tmp.open("wb") as f:
                    np.savez(f, train_x=tx, train_y=ty, test_x=sx, test_y=sy,
                             classes=np.array(classes), fingerprint=np.array(fp))

            atomic_write(cache, write)
            arrays = _read_decoded(cache)
            if arrays is None:  # pragma: no cover - the disk failed under us
                raise KdigError(f"data cache {cache}: unreadable right after writing it")
    about = DATASETS[cfg.dataset]
    expected = about.coarse_classes if _coarse(cfg) else about.classes
    found = len(arrays["classes"])
    if (expected is not None and found != expected) or found < 2:
        raise KdigError(f"{target}: found {found} classes; "
                        + (f"{about.title} has {expected} (or set "
                           f"data.dataset = \"folder\" for a data set of its own)"
                           if expected else "a data set needs at least 2"))
    return DecodedDataset(
        train=ImageSet(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"])),
        test=ImageSet(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"])),
        classes=tuple(str(c) for c in arrays["classes"]),
        fingerprint=str(arrays["fingerprint"]),
        origin=f"{kind}:{target}",
    )


_DECODED_KEYS = ("train_x", "train_y", "test_x", "test_y", "classes", "fingerprint")


def _read_decoded(cache: Path) -> dict[str, np.ndarray] | None:
    """The decoded data set's arrays, or None where the cache is missing or damaged (a
    damaged one gave a traceback on every run, and was never removed)."""
    try:
        with np.load(cache) as z:
            arrays = {k: z[k] for k in _DECODED_KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    n_train, n_test = len(arrays["train_y"]), len(arrays["test_y"])
    if len(arrays["train_x"]) != n_train or len(arrays["test_x"]) != n_test or not n_train:
        return None
    return arrays


# ---------------------------------------------------------------------------------------------
# Splits


def stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` whose every prefix is (nearly) class-balanced.

    Each class is shuffled, then the classes are interleaved by their relative rank
    (i + 0.5) / n_class, so a prefix of length m holds about m * n_class / N of each class.
    """
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    key = torch.empty(n, dtype=torch.float64)
    for c in labels.unique():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(members.numel(), generator=g)]
        key[members] = (torch.arange(members.numel(), dtype=torch.float64) + 0.5) / members.numel()
    # Equal keys (classes of equal size) fall back to label order: a stable sort over
    # label-sorted rows keeps the result deterministic.
    by_label = torch.argsort(labels, stable=True)
    return by_label[torch.argsort(key[by_label], stable=True)]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.to(torch.float64).div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize_uint8(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                    std: Sequence[float] | torch.Tensor,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images [N, 3, H, W] as the networks see them, float32 ``(x / 255 - mean) / std``
    per channel (the data set's mean and std: a sequence, or a [1, 3, 1, 1] tensor), on
    ``device`` when given (the uint8 images move first). The batch loader folds the same
    arithmetic into one multiply-add; whole-split passes (maps, benchmarks, the deletion
    check) use this plain form."""
    x = images if device is None else images.to(device)
    mean_t = torch.as_tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean_t) / std_t


def make_bundle(source: DecodedDataset, cfg: DataConfig) -> DataBundle:
    """Hold out a stratified validation split from the training pool; keep the test split
    apart (optionally a stratified subset of it)."""
    pool = len(source.train)
    if cfg.val_size >= pool:
        raise KdigError(f"data.val_size = {cfg.val_size} leaves no training images "
                        f"(the training pool has {pool}); allowed: < {pool}")
    order = stratified_order(source.train.labels, cfg.split_seed)
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size:]
    test = source.test
    if cfg.test_size and cfg.test_size < len(test):
        keep = stratified_order(test.labels, cfg.split_seed + 1)[: cfg.test_size]
        test = test.take(keep.sort().values)
    train = source.train.take(train_idx)
    if cfg.normalize:
        mean, std = _channel_stats(train.images)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    fp = hashlib.sha256(json.dumps(
        [source.fingerprint, cfg.val_size, cfg.test_size, cfg.split_seed, cfg.normalize,
         cfg.pad, cfg.flip]
    ).encode()).hexdigest()
    return DataBundle(train=train, train_index=train_idx, val=source.train.take(val_idx),
                      test=test, classes=source.classes, mean=mean, std=std,  # type: ignore[arg-type]
                      fingerprint=fp, origin=source.origin, pad=cfg.pad, flip=cfg.flip)


def load_bundle(cfg: DataConfig, data_dir: str | None = None, progress: bool = True
                ) -> DataBundle:
    return make_bundle(load_source(cfg, data_dir, progress), cfg)


# ---------------------------------------------------------------------------------------------
# Loader


class Batch(NamedTuple):
    x: torch.Tensor  # [B, 3, 32, 32] float, normalised, channels_last: the model's input
    x_clean: torch.Tensor  # same, without the overlay (what a KD teacher sees); `x` if none
    y: torch.Tensor  # [B] int64
    index: torch.Tensor  # [B] row of each image in the loader's set (on the CPU)


# (x01 [B, 3, H, W] in [0, 1], planes [B, P, H, W], generator) -> overlaid x01, a new tensor
# (x01 itself stays untouched: it is what a KD teacher sees).
Overlay = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


class BatchLoader:
    """Batches of an in-memory uint8 image set, augmented on whole batches on its device.

    Every crop of every image is a strided view of one padded copy (and, for flips, one
    mirrored copy), so a batch is one indexing op: [flip, image, dy, dx] -> [B, C, H, W].
    The data are stored channels-last (NHWC), so batches come out channels-last as the
    models want them. Deterministic under ``seed``: a new loader with the same seed yields
    the same epochs. Epoch order, crops and flips draw from one generator; the overlay from
    its own (seeded from the same seed), so switching the overlay on leaves every image,
    crop and flip of every epoch where it was (a paired IG-on / IG-off comparison).
    """

    def __init__(self, data: ImageSet, *, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device | str = "cpu",
                 train: bool = False, pad: int = 4, flip: bool = True, seed: int = 0,
                 planes: torch.Tensor | None = None, overlay: Overlay | None = None,
                 drop_last: bool = False) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train, self.pad, self.flip = train, (pad if train else 0), (flip and train)
        self.drop_last = drop_last
        self.n = len(data)
        self.size = tuple(data.images.shape[-2:])
        self.crops = self._crop_view(data.images)
        self.labels = data.labels.to(self.device)
        self.plane_crops = None
        if planes is not None:
            if planes.shape[0] != self.n or planes.shape[-2:] != data.images.shape[-2:]:
                raise ValueError(f"planes {tuple(planes.shape)} do not match images "
                                 f"{tuple(data.images.shape)}")
            self.plane_crops = self._crop_view(planes)
        self.overlay = overlay
        mean_t = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        inv_std = 1.0 / torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.mean, self.inv_std = mean_t, inv_std
        # uint8 -> normalised float in one fused op: x * scale + shift
        self.scale, self.shift = inv_std / 255.0, -mean_t * inv_std
        self.generator = torch.Generator().manual_seed(seed)
        self.overlay_generator = torch.Generator().manual_seed(derive_seed(seed, "overlay"))

    def _crop_view(self, t: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> a view [V, N, 2p+1, 2p+1, C, H, W] of every crop (V = 2 with flips)."""
        p = self.pad
        padded = torch.nn.functional.pad(t, (p, p, p, p))
        versions = [padded, padded.flip(-1)] if self.flip else [padded]
        store = torch.stack(versions).permute(0, 1, 3, 4, 2).contiguous().to(self.device)
        v, n, hp, wp, c = store.shape
        h, w = hp - 2 * p, wp - 2 * p
        s = store.stride()
        return store.as_strided((v, n, 2 * p + 1, 2 * p + 1, c, h, w),
                                (s[0], s[1], s[2], s[3], s[4], s[2], s[3]))

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def _offsets(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: mirrored or not, crop row offset, crop column offset."""
        g, span = self.generator, 2 * self.pad + 1
        if not self.train:
            zero = torch.zeros(b, dtype=torch.long)
            return zero, zero, zero
        flip = (torch.rand(b, generator=g) < 0.5).long() if self.flip \
            else torch.zeros(b, dtype=torch.long)
        dy = torch.randint(0, span, (b,), generator=g)
        dx = torch.randint(0, span, (b,), generator=g)
        return flip, dy, dx

    def __iter__(self) -> Iterator[Batch]:
        if self.train:
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            idx = order[start: start + self.batch_size]
            if self.drop_last and idx.numel() < self.batch_size:
                break
            # One index tuple for the images and their planes: the same crop and flip.
            at = tuple(t.to(self.device) for t in (*self._offsets(idx.numel()), idx))
            key = (at[0], at[3], at[1], at[2])
            images = self.crops[key]  # [B, 3, H, W] uint8, channels-last
            y = self.labels[at[3]]
            x_clean = torch.addcmul(self.shift, images.float(), self.scale)
            if self.overlay is None or self.plane_crops is None or \
                    not getattr(self.overlay, "active", True):
                yield Batch(x_clean, x_clean, y, idx)
                continue
            x01 = self.overlay(images.float().div_(255), self.plane_crops[key].float(),
                               self.overlay_generator)
            yield Batch(self._normalise(x01), x_clean, y, idx)

    def _normalise(self, x01: torch.Tensor) -> torch.Tensor:
        return ((x01 - self.mean) * self.inv_std).contiguous(memory_format=torch.channels_last)
