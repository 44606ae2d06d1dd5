"""Image classification data: scikit-learn's bundled digits (default, no download) and CIFAR-10.

CIFAR-10 is read from its binary distribution (`cifar-10-batches-bin`: each record is one label
byte then 3072 pixel bytes, channel-major) and never unpickled. Images stay uint8 in memory and
are normalised per batch, so the 50,000 CIFAR images cost 150 MB, not 600.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from triton_workbench.kernels.errors import UsageError

DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10")
CIFAR_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{index}.bin" for index in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
# Per-channel statistics of the CIFAR-10 training set (pixels scaled to [0, 1]).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_HELD_OUT_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed: the held-out split never depends on the training seed


@dataclass(frozen=True)
class ImageSet:
    """uint8 images (N, C, H, W) with int64 labels, normalised on the way out: (x / max - mean) / std."""

    images: torch.Tensor
    labels: torch.Tensor
    max_value: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, count: int) -> ImageSet:
        """The first `count` images (all of them if there are fewer)."""
        return ImageSet(self.images[:count], self.labels[:count], self.max_value, self.mean, self.std)

    def batch(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised float32 images and the labels at `indices`."""
        index = torch.as_tensor(indices, dtype=torch.long)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        images = self.images[index].to(torch.float32) / self.max_value
        return (images - mean) / std, self.labels[index]


@dataclass(frozen=True)
class Dataset:
    """A training set and a held-out set, with the shape facts a model needs."""

    name: str
    train: ImageSet
    test: ImageSet
    in_channels: int
    image_size: int
    num_classes: int


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """The dataset `name` ("digits" or "cifar10"; cifar10 needs `data_dir`)."""
    if name == "digits":
        return load_digits()
    if name == "cifar10":
        if data_dir is None:
            raise UsageError("data_dir is required for cifar10 (--data-dir): a folder holding cifar-10-batches-bin")
        return load_cifar10(data_dir)
    raise UsageError(f"dataset {name!r} is unknown: expected one of {', '.join(DATASET_NAMES)}")


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits (pixels 0..16), 20% held out by a fixed permutation."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # values 0..16 fit a uint8
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    held_out = int(round(len(labels) * DIGITS_HELD_OUT_FRACTION))
    test_index, train_index = order[:held_out], order[held_out:]
    scaled = images[train_index].to(torch.float64) / 16.0
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    return Dataset(
        name="digits",
        train=ImageSet(images[train_index], labels[train_index], 16.0, mean, std),
        test=ImageSet(images[test_index], labels[test_index], 16.0, mean, std),
        in_channels=1,
        image_size=8,
        num_classes=10,
    )


def load_cifar10(data_dir: str | Path) -> Dataset:
    """CIFAR-10 from `data_dir` (the `cifar-10-batches-bin` folder itself, or a folder holding it)."""
    folder = _cifar_folder(Path(data_dir))
    train_images, train_labels = zip(*(_read_cifar_file(folder / name) for name in CIFAR_TRAIN_FILES))
    test_images, test_labels = _read_cifar_file(folder / CIFAR_TEST_FILE)
    return Dataset(
        name="cifar10",
        train=ImageSet(torch.cat(train_images), torch.cat(train_labels), 255.0, CIFAR_MEAN, CIFAR_STD),
        test=ImageSet(test_images, test_labels, 255.0, CIFAR_MEAN, CIFAR_STD),
        in_channels=3,
        image_size=32,
        num_classes=10,
    )


def _cifar_folder(data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"CIFAR-10 data directory {data_dir} does not exist")
    for folder in (data_dir, data_dir / "cifar-10-batches-bin"):
        if (folder / CIFAR_TEST_FILE).exists() or (folder / CIFAR_TRAIN_FILES[0]).exists():
            break
    missing = [name for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 binary files missing in {folder}: {', '.join(missing)} "
            "(expected the cifar-10-batches-bin folder: data_batch_1..5.bin and test_batch.bin)"
        )
    return folder


def _read_cifar_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one binary batch file."""
    size_bytes = path.stat().st_size
    if size_bytes == 0 or size_bytes % CIFAR_RECORD_BYTES:
        raise UsageError(
            f"CIFAR-10 file {path} is malformed: {size_bytes} bytes is not a positive multiple of "
            f"the {CIFAR_RECORD_BYTES}-byte record (1 label byte + 3072 pixel bytes)"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise UsageError(f"CIFAR-10 file {path} is malformed: label {labels.max()} outside 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return torch.from_numpy(images), torch.from_numpy(labels)
