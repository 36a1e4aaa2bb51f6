import gzip
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.errors import DataError
from app.ml.datasets import ImageDataset, load_dataset, read_idx
from tests.conftest import MNIST
from tests.helpers import png_bytes


def _idx(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def idx_pair(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 5, 4), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.arange(12) % 3))
    return tmp_path / "train-images-idx3-ubyte.gz"


def test_idx_gzipped_and_plain(idx_pair: Path) -> None:
    dataset = load_dataset(str(idx_pair))
    assert dataset.images.shape == (12, 5, 4, 1) and dataset.class_names == ["0", "1", "2"]
    assert dataset.labels.tolist() == [i % 3 for i in range(12)]
    assert load_dataset(str(idx_pair.parent)).fingerprint() == dataset.fingerprint()


def test_real_mnist_and_slices() -> None:
    dataset = load_dataset(str(MNIST))
    assert dataset.images.shape == (8000, 28, 28, 1)
    assert np.bincount(dataset.labels).tolist() == [773, 905, 834, 803, 788, 723, 756, 813, 787, 818]
    tail = load_dataset(f"{MNIST}#7000:")
    assert len(tail) == 1000 and np.array_equal(tail.images, dataset.images[7000:])
    holed = load_dataset(f"{MNIST}#0:1000,2000:8000")
    assert len(holed) == 7000 and np.array_equal(holed.labels[1000:], dataset.labels[2000:])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw[:-7], "truncated"),
        (lambda raw: b"\x01\x02" + raw[2:], "magic"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], "data type"),
        (lambda raw: raw[:6], "truncated IDX header"),
        (lambda raw: gzip.compress(raw)[:-10], "decompress"),
    ],
)
def test_idx_bad_files(tmp_path: Path, mutate, message: str) -> None:
    raw = _idx(np.zeros((3, 4, 4), np.uint8))
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(mutate(raw))
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    (tmp_path / "images-idx3-ubyte").write_bytes(_idx(np.zeros((4, 3, 3), np.uint8)))
    (tmp_path / "labels-idx1-ubyte").write_bytes(_idx(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="5 labels for 4 images"):
        load_dataset(str(tmp_path / "images-idx3-ubyte"))


def _make_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (6, 6)) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(png_bytes(np.full(size, 40 * i, np.uint8)))


def test_image_folder_directory_and_zip(tmp_path: Path) -> None:
    _make_folder(tmp_path / "data", {"cat": 2, "dog": 3})
    (tmp_path / "data" / "labels.csv").write_text("ignored at the top level\n")
    dataset = load_dataset(str(tmp_path / "data"))
    assert dataset.class_names == ["cat", "dog"] and dataset.labels.tolist() == [0, 0, 1, 1, 1]
    assert dataset.images.shape == (5, 6, 6, 1)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        for file in sorted((tmp_path / "data").rglob("*.png")):
            archive.write(file, f"top/{file.relative_to(tmp_path / 'data')}")
    zipped = load_dataset(str(tmp_path / "data.zip"))
    assert zipped.fingerprint() == dataset.fingerprint()


def test_image_folder_colour_mode(tmp_path: Path) -> None:
    """Colour images give a colour dataset; RGB files whose channels are equal are greyscale in fact."""
    (tmp_path / "a").mkdir()
    colour = np.zeros((4, 5, 3), np.uint8)
    colour[..., 0] = 200
    (tmp_path / "a" / "x.png").write_bytes(png_bytes(colour))
    assert load_dataset(str(tmp_path)).images.shape == (1, 4, 5, 3)
    (tmp_path / "a" / "x.png").write_bytes(png_bytes(np.full((4, 5, 3), 90, np.uint8)))
    assert load_dataset(str(tmp_path)).images.shape == (1, 4, 5, 1)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: (root / "a" / "notes.txt").write_text("hi"), "not an image"),
        (lambda root: (root / "empty").mkdir(), "class .empty. has 0 image"),
        (lambda root: (root / "a" / "bad.png").write_bytes(b"\x89PNG garbage"), "not a readable"),
        (lambda root: (root / "a" / "big.png").write_bytes(png_bytes(np.zeros((9, 9), np.uint8))),
         "big.png: 9×9 pixels, but 2 of 3 images are 6×6"),
    ],
)
def test_image_folder_bad(tmp_path: Path, setup, message: str) -> None:
    _make_folder(tmp_path, {"a": 2})
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize(("name", "message"), [("../evil/x.png", "unsafe"), ("/abs/x.png", "unsafe"),
                                               ("a/readme.md", "not an image")])
def test_zip_bad_members(tmp_path: Path, name: str, message: str) -> None:
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as archive:
        archive.writestr("a/0.png", png_bytes(np.zeros((4, 4), np.uint8)))
        archive.writestr(name, b"data")
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / "d.zip"))


def test_zip_empty_class_and_not_a_zip(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as archive:
        archive.writestr("a/0.png", png_bytes(np.zeros((4, 4), np.uint8)))
        archive.writestr("b/", b"")
    with pytest.raises(DataError, match="class 'b' has 0 image"):
        load_dataset(str(tmp_path / "d.zip"))
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip"):
        load_dataset(str(tmp_path / "x.zip"))


def test_npz_good_and_bad(tmp_path: Path) -> None:
    images = np.zeros((4, 5, 5), np.uint8)
    np.savez(tmp_path / "ok.npz", images=images, labels=np.array([0, 1, 1, 0]), class_names=np.array(["a", "b"]))
    dataset = load_dataset(str(tmp_path / "ok.npz"))
    assert dataset.images.shape == (4, 5, 5, 1) and dataset.class_names == ["a", "b"]
    np.savez(tmp_path / "nolabels.npz", images=images)
    with pytest.raises(DataError, match="missing arrays"):
        load_dataset(str(tmp_path / "nolabels.npz"))
    np.savez(tmp_path / "count.npz", images=images, labels=np.array([0, 1]))
    with pytest.raises(DataError, match="2 labels for 4 images"):
        load_dataset(str(tmp_path / "count.npz"))
    np.savez(tmp_path / "pickled.npz", images=images, labels=np.array([{"x": 1}] * 4, dtype=object))
    with pytest.raises(DataError, match="pickled"):
        load_dataset(str(tmp_path / "pickled.npz"))
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32), labels=np.zeros(4, int))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(str(tmp_path / "float.npz"))


def test_digits_and_unknown_specs(tmp_path: Path) -> None:
    digits = load_dataset("digits")
    assert digits.images.shape == (1797, 8, 8, 1) and digits.images.max() == 255
    with pytest.raises(DataError, match="neither an existing path"):
        load_dataset(str(tmp_path / "missing.npz"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="empty"):
        load_dataset("digits#5:5")


def test_split_is_seeded_and_disjoint() -> None:
    dataset = ImageDataset(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), np.zeros(100, np.int64), ["x"])
    train, val = dataset.split(0.2)
    again_train, _ = dataset.split(0.2)
    assert len(val) == 20 and len(train) == 80
    assert not set(train.images.ravel()) & set(val.images.ravel())
    assert np.array_equal(train.images, again_train.images)


def test_aligned_to_renumbers_by_class_name() -> None:
    images = np.zeros((3, 2, 2, 1), np.uint8)
    named = ImageDataset(images, np.array([0, 1, 2]), ["t-shirt", "trouser", "bag"])
    aligned = named.aligned_to(["bag", "t-shirt", "trouser"])  # an ImageFolder's sorted order
    assert aligned.labels.tolist() == [1, 2, 0] and aligned.class_names == ["bag", "t-shirt", "trouser"]
    indices = ImageDataset(images, np.array([0, 1, 2]), ["0", "1", "2"])  # IDX: no names, the indices are trusted
    assert indices.aligned_to(["bag", "t-shirt", "trouser"]) is indices
    with pytest.raises(DataError, match="not the model's"):
        named.aligned_to(["cat", "dog", "bird"])


def test_bad_slices_labels_and_channels_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="the slice #a:b is not START:STOP"):
        load_dataset("digits#a:b")
    np.savez(tmp_path / "negative.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.full(4, -1))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.0 \(one per class name\), got -1\.\.-1"):
        load_dataset(str(tmp_path / "negative.npz"))
    np.savez(tmp_path / "five.npz", images=np.zeros((4, 8, 8, 5), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="1 \\(grey\\) or 3 \\(RGB\\) channels, not 5"):
        load_dataset(str(tmp_path / "five.npz"))
