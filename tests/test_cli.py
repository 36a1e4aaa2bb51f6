"""The `synthgen` command line: generate (npz, zip, directory, grid), argument errors, and `dataset`."""

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.ml.datasets import load_dataset


def _generate(model: Path, out: Path, *args: str) -> int:
    return main(["generate", "--model", str(model), "--seed", "7", "--out", str(out), "--device", "cpu", *args])


def test_npz_per_class(tiny_gan: Path, tmp_path: Path) -> None:
    assert _generate(tiny_gan, tmp_path / "x.npz", "--per-class", "3") == 0
    with np.load(tmp_path / "x.npz", allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    assert images.dtype == np.uint8 and images.shape == (30, 8, 8)
    assert labels.dtype == np.int64 and labels.tolist() == [i // 3 for i in range(30)]


def test_same_command_same_bytes(tiny_vae: Path, tmp_path: Path) -> None:
    for suffix in (".npz", ".zip"):
        assert _generate(tiny_vae, tmp_path / f"a{suffix}", "--n", "12") == 0
        assert _generate(tiny_vae, tmp_path / f"b{suffix}", "--n", "12") == 0
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    assert _generate(tiny_vae, tmp_path / "c.npz", "--n", "12", "--seed", "8") == 0
    assert (tmp_path / "c.npz").read_bytes() != (tmp_path / "a.npz").read_bytes()


def test_zip_and_directory_layout(tiny_gan: Path, tmp_path: Path) -> None:
    assert _generate(tiny_gan, tmp_path / "x.zip", "--n", "6", "--label", "4") == 0
    assert _generate(tiny_gan, tmp_path / "folder", "--n", "6", "--label", "4") == 0
    with zipfile.ZipFile(tmp_path / "x.zip") as archive:
        names = archive.namelist()
        assert names[:6] == [f"4/{i:08d}.png" for i in range(6)]
        rows = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
        manifest = json.loads(archive.read("manifest.json"))
        for row in rows:
            assert Image.open(io.BytesIO(archive.read(row["file_name"]))).size == (8, 8)
            assert row["label"] == "4" and row["class_name"] == "4" and row["seed"] == "7"
    assert [int(row["index"]) for row in rows] == list(range(6))
    assert manifest["model"] == "digits-gan" and manifest["counts"] == {"4": 6} and manifest["seed"] == 7
    assert manifest["config_hash"].startswith("sha256:")
    for name in names:
        assert (tmp_path / "folder" / name).read_bytes() == zipfile.ZipFile(tmp_path / "x.zip").read(name)
    assert load_dataset(str(tmp_path / "x.zip")).images.shape == (6, 8, 8, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "3", "--label", "cat"], "unknown label 'cat'"),
        (["--n", "3", "--per-class", "2"], "exactly one of"),
        (["--n", "0"], "at least 1"),
        (["--per-class", "2", "--label", "1"], "label goes with n"),
    ],
)
def test_bad_arguments_exit_cleanly(tiny_gan: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert _generate(tiny_gan, tmp_path / "x.npz", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_bad_model_folder_exits_cleanly(tmp_path: Path, capsys) -> None:
    assert _generate(tmp_path / "nope", tmp_path / "x.npz", "--n", "1") == 2
    assert "no such model folder" in capsys.readouterr().err


def test_dataset_command_is_the_clients(server: tuple[str, int], tmp_path: Path) -> None:
    url, _ = server
    assert main(["dataset", "--server", url, "--model", "digits-gan", "--per-class", "2", "--seed", "1",
                 "--out", str(tmp_path / "d.zip")]) == 0
    assert load_dataset(str(tmp_path / "d.zip")).labels.tolist() == [i // 2 for i in range(20)]
