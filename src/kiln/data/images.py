"""Image folders: ``root/<class>/<image>``, loaded lazily with Pillow.

Why lazy: an image folder may not fit in memory, so the dataset keeps file paths and opens an
image in ``__getitem__`` (also in DataLoader workers, since it pickles as a list of paths).
Images are converted to RGB (or one grayscale channel when every image is grayscale), resized
to ``image_size x image_size`` (bilinear, aspect ratio not kept), scaled to [0, 1] and
normalised with per-channel mean/std measured on the train split only. torchvision is not a
dependency (see DESIGN.md), so these few transforms are written here. Every file is decoded once
when the data is built, so a damaged or non-image file is refused by name before training starts.

Example:
    >>> from kiln.config import DataConfig
    >>> cfg = DataConfig(name="images", path="photos/")
    >>> bundle = build_image_folder(cfg, seed=0)  # doctest: +SKIP
    >>> bundle.info.input_shape, bundle.info.class_names  # doctest: +SKIP
    ((3, 32, 32), ['cat', 'dog'])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kiln.config import DataConfig
from kiln.data.base import DataBundle, DataInfo
from kiln.data.splits import split_indices, subset_splits
from kiln.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "build_image_folder",
    "find_images",
    "open_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_GRAY_MODES = {"1", "L"}


class ImageFolderDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Image files and class indices; each item is opened, resized and normalised on access.

    Args:
        files: image paths.
        labels: class index per file.
        size: output height and width.
        channels: 3 (RGB) or 1 (grayscale).
        mean: per-channel mean subtracted after scaling to [0, 1] (None: no normalisation).
        std: per-channel std divided by (with ``mean``).

    Example:
        >>> ds = ImageFolderDataset(["a.png"], [0], size=32)  # doctest: +SKIP
        >>> ds[0][0].shape  # doctest: +SKIP
        torch.Size([3, 32, 32])
    """

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        *,
        size: int,
        channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        if len(files) != len(labels):
            raise DataError(f"{len(files)} files but {len(labels)} labels")
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        self.files = files
        self.labels = labels
        self.size = size
        self.channels = channels
        self.mean = torch.tensor(mean).view(-1, 1, 1) if mean is not None else None
        self.std = torch.tensor(std).view(-1, 1, 1) if std is not None else None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        """Image ``i`` as a ``(C, size, size)`` float tensor in [0, 1], not normalised."""
        from PIL import Image

        pic = open_image(self.files[i], "L" if self.channels == 1 else "RGB")
        pic = pic.resize((self.size, self.size), Image.Resampling.BILINEAR)
        # np.array copies into a writable buffer; torch.from_numpy warns on read-only ones.
        arr = np.array(pic, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.load(i)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x, torch.tensor(self.labels[i], dtype=torch.int64)


def find_images(root: Path) -> tuple[list[str], list[int], list[str]]:
    """Image files under ``root/<class>/``: ``(files, labels, class names)``; classes sorted.

    Files are found recursively inside each class folder; hidden files and folders are skipped.

    Raises:
        DataError: ``root`` is missing, has no class subfolders, or a class has no images.
    """
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "not found"
        raise DataError(
            f"image folder {what}: {root} (resolved: {root.resolve()}); set data.path to a "
            "folder holding one subfolder per class"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"{root} has no class subfolders; arrange images as {root}/<class>/<image>.png, "
            "one subfolder per class"
        )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not found:
            raise DataError(
                f"class folder {root / name} has no images (looked for "
                f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        files.extend(str(p) for p in found)
        labels.extend([label] * len(found))
    return files, labels, classes


def open_image(path: str, mode: str | None = None) -> PILImage:
    """Open and fully decode one image file, converted to ``mode`` (None: as stored).

    Raises:
        DataError: the file is not an image Pillow can read, or it is damaged (truncated,
            bad checksum, a decompression bomb); the message names the file and the fix.

    Example:
        >>> open_image("photos/cat/1.png", "RGB").size  # doctest: +SKIP
        (64, 48)
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decodes every byte now, so a truncated file fails here
            return img.convert(mode) if mode is not None else img.copy()
    except (MemoryError, PermissionError):
        raise  # not the file's content; the CLI names an unreadable file itself
    except UnidentifiedImageError:
        reason = "not an image format Pillow reads, or the header is damaged"
    except FileNotFoundError:
        raise DataError(
            f"image {path} was removed after the folder was listed; restore it or start again"
        ) from None
    except Exception as exc:
        # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error or its
        # DecompressionBombError for damaged files, varying by format: all are the file's fault.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    raise DataError(f"image {path} cannot be read ({reason}); remove or replace that file")


def _channels(files: list[str]) -> int:
    """1 when every image is grayscale, else 3 (RGB).

    Every file is decoded here, once, so a damaged image is reported before training starts,
    not in the middle of an epoch (or inside a DataLoader worker, where the message would come
    back wrapped in the worker's traceback).
    """
    channels = 1
    for f in files:
        if open_image(f).mode not in _GRAY_MODES:
            channels = 3
    return channels


def _train_stats(ds: ImageFolderDataset, idx: list[int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std over every pixel of the images ``idx``."""
    total = torch.zeros(ds.channels, dtype=torch.float64)
    total_sq = torch.zeros(ds.channels, dtype=torch.float64)
    for i in idx:
        x = ds.load(i).to(torch.float64).flatten(1)
        total += x.sum(dim=1)
        total_sq += (x * x).sum(dim=1)
    count = len(idx) * ds.size * ds.size
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant channel is only centred
    return mean.tolist(), std.tolist()


def build_image_folder(cfg: DataConfig, *, seed: int) -> DataBundle:
    """Split an image folder (stratified) and normalise with train-split channel statistics.

    Args:
        cfg: uses ``path``, ``image_size``, ``standardize``, ``val_fraction``, ``test_fraction``
            and ``task`` (``auto`` or ``classification``).
        seed: seeds the split.

    Returns:
        Subsets of one lazy :class:`ImageFolderDataset`: inputs ``(C, S, S)`` float32, targets
        int64 class indices (classes = sorted subfolder names).
    """
    if cfg.task == "regression":
        raise DataError("image folders are labelled by class; set data.task=auto")
    root = Path(cfg.path or "")
    files, labels, classes = find_images(root)
    if len(classes) < 2:
        raise DataError(
            f"{root} has one class folder ({classes[0]!r}); classification needs at least two: "
            f"add a folder per class ({root}/<class>/<image>)"
        )
    channels = _channels(files)
    train_idx, val_idx, test_idx = split_indices(
        len(files),
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=seed,
        stratify=labels,
    )
    extra: dict[str, Any] = {
        "source": "images",
        "root": str(root),
        "channels": channels,
        "splits": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
    }
    mean = std = None
    if cfg.standardize:
        plain = ImageFolderDataset(files, labels, size=cfg.image_size, channels=channels)
        mean, std = _train_stats(plain, train_idx)
        extra["mean"], extra["std"] = mean, std
    dataset = ImageFolderDataset(
        files, labels, size=cfg.image_size, channels=channels, mean=mean, std=std
    )
    train, val, test = subset_splits(dataset, train_idx, val_idx, test_idx)
    info = DataInfo(
        task="classification",
        input_shape=(channels, cfg.image_size, cfg.image_size),
        num_classes=len(classes),
        class_names=classes,
        extra=extra,
    )
    return DataBundle(train=train, val=val, test=test, info=info)
