from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdig_study import data as data_mod
from kdig_study.config import DataConfig, load_study
from kdig_study.data import (
    BatchLoader,
    ImageSet,
    load_bundle,
    load_source,
    make_bundle,
    stratified_order,
)
from kdig_study.errors import KdigError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def _make_tree(root: Path, per_class: int = 4, ext: str = ".png") -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.full((32, 32, 3), c * 20, dtype=np.uint8)
                arr[0, 0] = (i, c, 7)  # identifies the image exactly (PNG is lossless)
                arr[5:9, 5:9] = rng.integers(0, 255, (4, 4, 3))
                Image.fromarray(arr).save(d / f"{i:04d}{ext}")


def test_stratified_order_every_prefix_is_balanced() -> None:
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(1000))
    for m in (10, 50, 100, 370):
        counts = torch.bincount(labels[order[:m]], minlength=10)
        assert counts.max() - counts.min() <= 1, (m, counts)
    assert not torch.equal(order, stratified_order(labels, seed=1))
    assert torch.equal(order, stratified_order(labels, seed=0))


def test_bundle_split_is_stratified_disjoint_and_test_apart() -> None:
    cfg = DataConfig(dataset="synthetic", synthetic_train=1000, synthetic_test=300, val_size=200)
    src = load_source(cfg)
    b = make_bundle(src, cfg)
    assert len(b.train) == 800 and len(b.val) == 200 and len(b.test) == 300
    train_idx = set(b.train_index.tolist())
    assert len(train_idx) == 800
    # validation rows are the pool rows not in train
    pool = {tuple(x) for x in src.train.images.flatten(1)[:, :64].tolist()}
    assert len(pool) == 1000  # synthetic images are distinct
    val_rows = set(range(1000)) - train_idx
    assert torch.equal(b.val.labels.sort().values, src.train.labels[sorted(val_rows)].sort().values)
    assert torch.bincount(b.val.labels, minlength=10).tolist() == [20] * 10
    # test split is the source test split, untouched
    assert torch.equal(b.test.images, src.test.images)
    # the train images are the pool images at train_index
    assert torch.equal(b.train.images, src.train.images[b.train_index])
    sub, idx = b.train_subset(100)
    assert len(sub) == 100 and torch.bincount(sub.labels, minlength=10).tolist() == [10] * 10
    assert torch.equal(idx, b.train_index[:100])


def test_loader_applies_one_crop_and_flip_to_image_and_plane() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 32, 32), generator=g, dtype=torch.uint8)
    planes = images[:, :1].float()  # a plane equal to the image's red channel
    seen = []

    def spy(x01: torch.Tensor, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # after crop/flip the plane must still equal the red channel of its image
        assert torch.equal(x01[:, 0] * 255, p[:, 0])
        seen.append(p.shape[0])
        return x01

    loader = BatchLoader(ImageSet(images, torch.zeros(50, dtype=torch.long)), batch_size=16,
                         mean=(0, 0, 0), std=(1, 1, 1), train=True, pad=4, flip=True, seed=1,
                         planes=planes, overlay=spy)
    batches = list(loader)
    assert sum(seen) == 50 and len(batches) == 4
    # the augmentation really moved pixels: some images differ from their un-augmented self
    moved = sum(not torch.equal((b.x * 255).round().byte(), images[b.index]) for b in batches)
    assert moved >= 3


def test_ig_on_and_ig_off_loaders_of_one_seed_see_the_same_images_crops_and_flips() -> None:
    """The overlay draws from its own generator: switching it on must not shift the data
    order, crops or flips of any epoch (it used to draw from the loader's generator, so an
    IG-on run saw other crops than the IG-off run of the same seed)."""
    from kdig_study.overlay import IGOverlay

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (90, 3, 32, 32), generator=g, dtype=torch.uint8)
    planes = torch.rand(90, 1, 32, 32, generator=g)
    data = ImageSet(images, torch.zeros(90, dtype=torch.long))
    common = dict(batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, pad=4,
                  flip=True, seed=7, drop_last=True)
    on = BatchLoader(data, planes=planes, overlay=IGOverlay(0.5, 0.5), **common)
    off = BatchLoader(data, **common)
    overlaid = 0
    for _ in range(3):  # epochs
        for a, b in zip(on, off, strict=True):
            assert torch.equal(a.index, b.index)
            assert torch.equal(a.x_clean, b.x_clean)  # same crop and flip of each image
            overlaid += int((a.x != a.x_clean).flatten(1).any(1).sum())
    assert overlaid > 0  # the overlay did act on the IG-on side


def test_loader_crop_is_a_shift_of_the_zero_padded_image() -> None:
    img = torch.arange(3 * 32 * 32).remainder(251).to(torch.uint8).view(1, 3, 32, 32)
    loader = BatchLoader(ImageSet(img.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long)),
                         batch_size=64, mean=(0, 0, 0), std=(1, 1, 1), train=True, pad=4,
                         flip=True, seed=0)
    out = (next(iter(loader)).x * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))[0]
    candidates = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    candidates += [c.flip(-1) for c in candidates]
    for o in out:
        assert any(torch.equal(o, c) for c in candidates)
    # and the offsets vary
    assert len({o.sum().item() for o in out}) > 10


def test_loader_is_reproducible_and_normalises_channels_last() -> None:
    cfg = DataConfig(dataset="synthetic", synthetic_train=300, synthetic_test=50, val_size=50)
    b = load_bundle(cfg)

    def epoch(seed: int) -> list[torch.Tensor]:
        ld = BatchLoader(b.train, batch_size=64, mean=b.mean, std=b.std, train=True, seed=seed)
        return [batch.x for batch in ld]

    a, c, d = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, d, strict=True))
    assert a[0].is_contiguous(memory_format=torch.channels_last)
    allx = torch.cat(a)
    assert allx.mean().abs() < 0.3 and 0.7 < allx.std() < 1.3  # roughly standardised


def test_synthetic_is_balanced_and_not_noise() -> None:
    x, y = data_mod.synthetic.generate(200, seed=0)
    assert x.dtype == torch.uint8 and x.shape == (200, 3, 32, 32)
    assert torch.bincount(y).tolist() == [20] * 10
    # class means differ clearly: the shapes carry signal
    xf = x.float().mean(1)  # [N, 32, 32]
    fg = (xf - xf.mean(dim=(1, 2), keepdim=True)).abs()
    centre = fg[:, 8:24, 8:24].mean()
    edge = torch.cat([fg[:, :3].flatten(1), fg[:, -3:].flatten(1)], 1).mean()
    assert centre > 2 * edge


@pytest.mark.parametrize("form", ["folder", "tar.gz", "tar"])
def test_image_folder_sources(tmp_path: Path, form: str) -> None:
    root = tmp_path / "tree"
    _make_tree(root)
    if form == "folder":
        path = root
    else:
        path = tmp_path / f"mini.{form}"
        with tarfile.open(path, "w:gz" if form == "tar.gz" else "w") as tar:
            tar.add(root, arcname="cifar")  # a top-level folder prefix is allowed
    cfg = DataConfig(path=str(path), val_size=10)
    src = load_source(cfg)
    assert src.classes == tuple(CLASSES)
    assert len(src.train) == 40 and len(src.test) == 20
    # image i of class c is the file NNNN = i: label and identity survive decoding
    for img, lab in zip(src.train.images, src.train.labels, strict=True):
        assert img[1, 0, 0].item() == lab.item()
        assert img[0, 1, 1].item() == lab.item() * 20


def test_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path: Path,
                                                             isolated_storage: Path) -> None:
    root = tmp_path / "tree"
    _make_tree(root, per_class=2)
    cfg = DataConfig(path=str(root), val_size=10)
    a = load_source(cfg)
    caches = list((isolated_storage / "cache" / "data").glob("*.npz"))
    assert len(caches) == 1
    again = load_source(cfg)
    assert again.fingerprint == a.fingerprint
    assert len(list((isolated_storage / "cache" / "data").glob("*.npz"))) == 1
    # change one image: a new cache and a new fingerprint
    f = root / "train" / "cat" / "0000.png"
    arr = np.asarray(Image.open(f)).copy()
    arr[10, 10] = 255 - arr[10, 10]
    Image.fromarray(arr).save(f)
    os.utime(f, ns=(1, 1))
    b = load_source(cfg)
    assert b.fingerprint != a.fingerprint
    assert len(list((isolated_storage / "cache" / "data").glob("*.npz"))) == 2


def test_torchvision_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision checks the md5 of the real archive files; these are made here, so that
    # check is bypassed and everything else (reading the pickles) is torchvision's own.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(range(10)) * 2
        batch = {"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8), "labels": labels}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    src = load_source(DataConfig(path=str(tmp_path)))
    assert len(src.train) == 100 and len(src.test) == 20 and src.classes == tuple(CLASSES)
    assert src.origin.startswith("torchvision:")


def test_missing_and_malformed_data_say_how_to_get_cifar(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KdigError, match=r"does not exist.*--data-dir DIR or KDIG_DATA=DIR"):
        load_source(DataConfig(path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdigError, match=r"holds no CIFAR-10.*torchvision.datasets.CIFAR10"):
        load_source(DataConfig(path=str(tmp_path / "empty")))
    monkeypatch.setenv("KDIG_DATA", str(tmp_path / "gone"))
    with pytest.raises(KdigError, match=r"from KDIG_DATA"):
        load_source(DataConfig())
    monkeypatch.delenv("KDIG_DATA")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar file at all")
    with pytest.raises(KdigError, match=r"cannot read archive") as e:
        load_source(DataConfig(path=str(bad)))
    assert "\n" not in str(e.value)
    mixed = tmp_path / "mixed"
    (mixed / "train" / "a").mkdir(parents=True)
    (mixed / "test" / "a").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(mixed / "train" / "a" / "x.png")
    Image.new("RGB", (32, 32)).save(mixed / "train" / "a" / "y.png")
    with pytest.raises(KdigError, match=r"y.png is 32x32, but the first image, .*x.png, is "
                                        r"64x64; set data.resize = \"stretch\" or "
                                        r"\"center_crop\" with data.image_size = N"):
        load_source(DataConfig(path=str(mixed)))


@pytest.mark.slow  # decodes the whole 60,000-image archive (about 20 s)
def test_real_cifar10_tree(shared_cifar: Path) -> None:
    src = load_source(DataConfig(path=str(shared_cifar)))
    assert len(src.train) == 50_000 and len(src.test) == 10_000
    assert src.classes == tuple(CLASSES)
    assert torch.bincount(src.train.labels).tolist() == [5000] * 10
    b = make_bundle(src, DataConfig(val_size=5000))
    assert len(b.train) == 45_000 and torch.bincount(b.val.labels).tolist() == [500] * 10
    assert 0.45 < b.mean[0] < 0.52 and 0.2 < b.std[2] < 0.3  # CIFAR-10 channel statistics


# --- data sets of their own: any class count, CIFAR-100, hostile folders (issue 28) ---

def _tree(root: Path, classes: list[str], train: int, test: int) -> None:
    for split, n in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.full((32, 32, 3), (c * 7) % 256, dtype=np.uint8)
                arr[0, 0] = (i, c, 9)
                Image.fromarray(arr).save(d / f"{i:03d}.png")


def _sized(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    """One image per name ("split/class/file": (width, height)): blue in its centre square,
    red beside it, so a centre crop and a stretch differ."""
    for name, (w, h) in sizes.items():
        arr = np.zeros((h, w, 3), dtype=np.uint8)
        arr[..., 0] = 255
        s = min(w, h)
        top, left = (h - s) // 2, (w - s) // 2
        arr[top:top + s, left:left + s] = (0, 0, 255)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / name)


def test_any_square_size_and_the_declared_resize_policy(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "d"
    _sized(root, {"train/a/0.png": (64, 64), "train/b/0.png": (64, 64),
                  "test/a/0.png": (64, 64), "test/b/0.png": (64, 64)})
    src = load_source(DataConfig(dataset="folder", path=str(root), val_size=10))
    assert src.train.images.shape == (2, 3, 64, 64)  # the images' own size
    assert "resized" not in capsys.readouterr().out
    _sized(root, {"train/b/1.png": (120, 40)})  # a wide image among square ones
    with pytest.raises(KdigError, match=r"b/1.png is 120x40, but the first image, .* is "
                                        r"64x64; set data.resize"):
        load_source(DataConfig(dataset="folder", path=str(root), val_size=10))
    with pytest.raises(KdigError, match=r"1.png is 120x40, but data.image_size = 64"):
        load_source(DataConfig(dataset="folder", path=str(root), val_size=10, image_size=64))
    # center_crop keeps the blue centre square; stretch keeps the red sides too
    crop = load_source(DataConfig(dataset="folder", path=str(root), val_size=10,
                                  image_size=64, resize="center_crop"))
    said = capsys.readouterr().out
    assert "resized 1 image(s) to 64x64 px by data.resize = 'center_crop' (e.g. " in said
    assert "1.png (120x40))" in said
    wide = crop.train.images[-1]  # class b, file 1: sorted last
    assert wide.shape == (3, 64, 64)
    assert wide[2].float().mean() > 250 and wide[0].float().mean() < 5
    stretch = load_source(DataConfig(dataset="folder", path=str(root), val_size=10,
                                     image_size=64, resize="stretch"))
    red = stretch.train.images[-1][0].float()
    assert red[:, :8].mean() > 250 and red[:, 28:36].mean() < 5
    assert stretch.fingerprint != crop.fingerprint
    # the square 64 px images are kept as they are under either policy
    assert torch.equal(stretch.train.images[:2], crop.train.images[:2])
    # downsizing: every image to 32 px
    small = load_source(DataConfig(dataset="folder", path=str(root), val_size=10,
                                   image_size=32, resize="stretch"))
    assert small.train.images.shape == (3, 3, 32, 32)
    assert "resized 5 image(s) to 32x32 px" in capsys.readouterr().out


def test_images_below_16_px_and_a_bare_resize_are_refused(tmp_path: Path) -> None:
    _sized(tmp_path / "d", {"train/a/0.png": (8, 8), "test/a/0.png": (8, 8)})
    with pytest.raises(KdigError, match=r"0.png is 8x8; allowed: 16 to 1024 px: set "
                                        r"data.image_size = N in that range with data.resize"):
        load_source(DataConfig(dataset="folder", path=str(tmp_path / "d"), val_size=10))
    with pytest.raises(KdigError, match=r"data.image_size = 8: allowed 0 \(the images' own "
                                        r"size\) or 16 and up"):
        load_study("kd_ig", "smoke", overrides=["data.image_size=8"])
    with pytest.raises(KdigError, match=r"data.resize = 'stretch' needs data.image_size"):
        load_study("kd_ig", "smoke", overrides=["data.resize=stretch"])


def test_synthetic_data_at_any_size() -> None:
    src = load_source(DataConfig(dataset="synthetic", image_size=48, synthetic_train=40,
                                 synthetic_test=20))
    assert src.train.images.shape == (40, 3, 48, 48)
    bundle = make_bundle(src, DataConfig(dataset="synthetic", val_size=10))
    assert bundle.image_size == 48
    assert "30 training images of 10 classes at 48 px" in bundle.describe()


def test_a_folder_data_set_takes_its_classes_from_the_folder_names(tmp_path: Path) -> None:
    names = ["beetle", "ant", "moth"]
    _tree(tmp_path / "bugs", names, train=5, test=2)
    src = load_source(DataConfig(dataset="folder", path=str(tmp_path / "bugs"), val_size=3))
    assert src.classes == ("ant", "beetle", "moth") and len(src.train) == 15
    assert src.origin.startswith("folder:")
    for img, lab in zip(src.train.images, src.train.labels, strict=True):
        # the pixel holds the folder it was written to; the label is that folder's rank
        assert src.classes[lab.item()] == names[img[1, 0, 0].item()]
    # as CIFAR-10 it is refused, saying what to set
    with pytest.raises(KdigError, match=r"found 3 classes; CIFAR-10 has 10 \(or set "
                                        r"data.dataset = \"folder\""):
        load_source(DataConfig(path=str(tmp_path / "bugs"), val_size=3))


def test_hostile_folders_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "d"
    _tree(root, ["a", "b"], train=3, test=1)
    cfg = DataConfig(dataset="folder", path=str(root), val_size=2)
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\1")  # hidden: skipped
    (root / "train" / "a" / "notes.txt").write_text("labels by hand")
    with pytest.raises(KdigError, match=r"train/a/notes.txt: not an image; a class folder "
                                        r"holds images only") as e:
        load_source(cfg)
    assert "\n" not in str(e.value)
    (root / "train" / "a" / "notes.txt").unlink()
    (root / "train" / "b" / "001.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(KdigError, match=r"cannot decode image .*train/b/001.png"):
        load_source(cfg)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8), mode="L").save(
        root / "train" / "b" / "001.png")  # grayscale: converted, said once
    for f in (root / "test" / "b").iterdir():  # a class with no test images
        f.unlink()
    with pytest.raises(KdigError, match=r"different class folders: \['a', 'b'\] vs \['a'\]"):
        load_source(cfg)
    _tree(tmp_path / "ok", ["a", "b"], train=3, test=1)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8), mode="L").save(
        tmp_path / "ok" / "train" / "b" / "001.png")
    capsys.readouterr()
    src = load_source(DataConfig(dataset="folder", path=str(tmp_path / "ok"), val_size=2))
    assert "converted 1 image(s) that were not RGB to RGB (e.g. " in capsys.readouterr().out
    assert src.train.images[src.train.labels == 1].shape[0] == 3


def _cifar100(root: Path) -> None:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per in (("train", 2), ("test", 1)):
        fine = [c for c in range(100) for _ in range(per)]
        batch = {"data": rng.integers(0, 255, (len(fine), 3072), dtype=np.uint8),
                 "fine_labels": fine, "coarse_labels": [c // 5 for c in fine]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]}, f)


def test_cifar100_in_torchvisions_format_with_fine_or_coarse_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # made here
    _cifar100(tmp_path)
    fine = load_source(DataConfig(dataset="cifar100", path=str(tmp_path), val_size=100))
    assert len(fine.classes) == 100 and fine.classes[7] == "fine07"
    assert len(fine.train) == 200 and len(fine.test) == 100
    coarse = load_source(DataConfig(dataset="cifar100", cifar100_labels="coarse",
                                    path=str(tmp_path), val_size=100))
    assert len(coarse.classes) == 20 and coarse.classes[3] == "coarse03"
    assert torch.equal(coarse.train.labels, fine.train.labels // 5)
    assert torch.equal(coarse.train.images, fine.train.images)
    # CIFAR's 32 px arrays at another size: refused unless a policy is declared
    with pytest.raises(KdigError, match=r"train\[0\] is 32x32, but data.image_size = 64"):
        load_source(DataConfig(dataset="cifar100", path=str(tmp_path), val_size=100,
                               image_size=64))
    big = load_source(DataConfig(dataset="cifar100", path=str(tmp_path), val_size=100,
                                 image_size=64, resize="stretch"))
    assert big.train.images.shape == (200, 3, 64, 64)
    assert torch.equal(big.train.labels, fine.train.labels)
    assert coarse.fingerprint != fine.fingerprint
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdigError, match=r"holds no CIFAR-100: expected cifar-100-python/.*"
                                        r"torchvision.datasets.CIFAR100"):
        load_source(DataConfig(dataset="cifar100", path=str(tmp_path / "empty")))
