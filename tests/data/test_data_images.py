"""Image folders: generated PNGs, resizing, channel handling, train-only normalisation, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from kiln.config import DataConfig
from kiln.data import build_data
from kiln.data.images import ImageFolderDataset


def _folder(root: Path, *, mode: str = "RGB", per_class: int = 5) -> Path:
    """cat/ images are reddish and 10x12, dog/ images bluish and 7x9 (different sizes)."""
    for cls, size, base in (("cat", (12, 10), (200, 40, 40)), ("dog", (9, 7), (30, 60, 220))):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            color = tuple(min(255, c + 5 * i) for c in base)
            img = Image.new("RGB", size, color)
            (img.convert("L") if mode == "L" else img).save(root / cls / f"{i}.png")
    return root


def _cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig(name="images", path=str(root), image_size=8, **kw)  # type: ignore[arg-type]


def test_rgb_folder_shapes_classes_and_resize(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets")
    (root / "cat" / "notes.txt").write_text("not an image")
    bundle = build_data(_cfg(root, val_fraction=0.2, test_fraction=0.2), seed=0)
    info = bundle.info
    assert info.task == "classification" and info.num_classes == 2
    assert info.class_names == ["cat", "dog"] and info.input_shape == (3, 8, 8)
    assert bundle.val is not None and bundle.test is not None
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 2, 2)
    x, y = bundle.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = [int(bundle.val[i][1]) for i in range(2)]
    assert sorted(labels) == [0, 1]  # stratified: one of each class
    json.dumps(info.extra)


def test_normalised_with_train_channel_statistics(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets")
    bundle = build_data(_cfg(root, val_fraction=0.2, test_fraction=0.2), seed=0)
    train = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))]).double()
    torch.testing.assert_close(train.mean((0, 2, 3)), torch.zeros(3).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        train.std((0, 2, 3), correction=0), torch.ones(3).double(), atol=1e-5, rtol=0
    )
    # A solid-colour image maps to (colour / 255 - mean) / std exactly.
    mean, std = bundle.info.extra["mean"], bundle.info.extra["std"]
    base = bundle.train.dataset  # type: ignore[attr-defined]
    first_cat = base.files.index(str(root / "cat" / "0.png"))
    x, y = base[first_cat]
    assert int(y) == 0
    ref = (torch.tensor([200, 40, 40]) / 255.0 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x[:, 3, 3], ref.float())


def test_all_grayscale_gives_one_channel(tmp_path: Path) -> None:
    root = _folder(tmp_path / "g", mode="L")
    bundle = build_data(_cfg(root), seed=0)
    assert bundle.info.input_shape == (1, 8, 8)
    assert bundle.train[0][0].shape == (1, 8, 8)


def test_mixed_modes_give_rgb(tmp_path: Path) -> None:
    root = _folder(tmp_path / "m")
    Image.new("L", (5, 5), 128).save(root / "dog" / "gray.PNG")  # upper-case suffix counts
    bundle = build_data(_cfg(root, standardize=False), seed=0)
    assert bundle.info.input_shape == (3, 8, 8)
    base = bundle.train.dataset  # type: ignore[attr-defined]
    assert len(base) == 11
    x, _ = base[base.files.index(str(root / "dog" / "gray.PNG"))]
    torch.testing.assert_close(x, torch.full((3, 8, 8), 128 / 255.0))


def test_dataset_is_lazy_about_files(tmp_path: Path) -> None:
    root = _folder(tmp_path / "pets")
    bundle = build_data(_cfg(root), seed=0)
    base = bundle.train.dataset  # type: ignore[attr-defined]
    assert isinstance(base, ImageFolderDataset)
    path = Path(base.files[0])
    Image.new("RGB", (3, 3), (0, 0, 0)).save(path)  # changed on disk after building
    assert base.load(0).abs().sum() == 0  # read at access time, not cached


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image folder not found"):
        build_data(_cfg(tmp_path / "none"), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class subfolders; arrange images as"):
        build_data(_cfg(tmp_path / "empty"), seed=0)
    root = _folder(tmp_path / "pets")
    (root / "fish").mkdir()
    (root / "fish" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*fish has no images \(looked for .png"):
        build_data(_cfg(root), seed=0)
