"""Digits (bundled) and CIFAR-10 read from its binary format, written here in that format."""

from pathlib import Path

import numpy as np
import pytest
import torch

from triton_workbench.workbench.data import CIFAR_MEAN, CIFAR_STD, CIFAR_TEST_FILE, CIFAR_TRAIN_FILES, load_cifar10, load_dataset, load_digits


def test_digits_split_is_deterministic_disjoint_and_normalised():
    first, second = load_digits(), load_digits()
    assert (len(first.train), len(first.test)) == (1438, 359)
    assert torch.equal(first.test.images, second.test.images) and torch.equal(first.train.labels, second.train.labels)
    # together the two parts are exactly sklearn's images (a partition: nothing lost, nothing copied)
    from sklearn.datasets import load_digits as sklearn_digits

    everything = torch.cat([first.train.images, first.test.images]).flatten(1).tolist()
    assert sorted(map(tuple, everything)) == sorted(map(tuple, sklearn_digits().images.reshape(-1, 64).astype(int).tolist()))
    images, labels = first.train.batch(range(len(first.train)))
    assert images.shape == (1438, 1, 8, 8) and images.dtype == torch.float32
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 1e-3
    assert set(labels.tolist()) == set(range(10))


def _write_cifar(folder: Path, records_per_file: int = 3) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        records = rng.integers(0, 256, size=(records_per_file, 3073), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, size=records_per_file)
        records.tofile(folder / name)
        written[name] = records
    return written


def test_cifar_binary_records_are_read_channel_major(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-bin")
    dataset = load_dataset("cifar10", tmp_path)  # the parent of cifar-10-batches-bin works too
    assert (len(dataset.train), len(dataset.test), dataset.in_channels, dataset.image_size) == (15, 3, 3, 32)
    record = written["data_batch_2.bin"][1]  # train image 3 + 1
    images, labels = dataset.train.batch([4])
    assert int(labels[0]) == record[0]
    red, green = record[1:1025].reshape(32, 32), record[1025:2049].reshape(32, 32)
    expected_red = (red / 255.0 - CIFAR_MEAN[0]) / CIFAR_STD[0]
    expected_green = (green / 255.0 - CIFAR_MEAN[1]) / CIFAR_STD[1]
    assert np.allclose(images[0, 0].numpy(), expected_red, atol=1e-5)
    assert np.allclose(images[0, 1].numpy(), expected_green, atol=1e-5)
    assert torch.equal(load_cifar10(tmp_path / "cifar-10-batches-bin").test.labels, torch.from_numpy(written[CIFAR_TEST_FILE][:, 0].astype(np.int64)))


def test_cifar_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_cifar10(tmp_path / "nowhere")
    folder = tmp_path / "cifar-10-batches-bin"
    _write_cifar(folder)
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing in {folder}: data_batch_4.bin"):
        load_cifar10(tmp_path)
    (folder / "data_batch_4.bin").write_bytes(bytes(3073 * 2 + 5))
    with pytest.raises(ValueError, match=f"{folder / 'data_batch_4.bin'} is malformed: 6151 bytes"):
        load_cifar10(folder)
    (folder / "data_batch_4.bin").write_bytes(bytes([12]) + bytes(3072))
    with pytest.raises(ValueError, match="label 12 outside 0..9"):
        load_cifar10(folder)


def test_unknown_dataset_and_missing_dir():
    with pytest.raises(ValueError, match="dataset 'mnist' is unknown"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="data_dir is required for cifar10"):
        load_dataset("cifar10")
