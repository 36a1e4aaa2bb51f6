"""The `synthgen` command line: generate (npz, zip, directory, grid), argument errors, and `dataset`."""

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.ml.datasets import load_dataset
from tests.conftest import TINY_GAN


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
        (["--n", "3", "--truncation", "nan"], "truncation must be in (0, 4], not nan"),
        (["--n", "3", "--truncation", "-1"], "truncation must be in (0, 4]"),
        (["--n", "3", "--seed", "-1"], "seed must be in 0..9007199254740991, not -1"),
        (["--n", "3", "--seed", "99999999999999999999"], "seed must be in 0..9007199254740991"),
    ],
)
def test_bad_arguments_exit_cleanly(tiny_gan: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert _generate(tiny_gan, tmp_path / "x.npz", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_bad_model_folder_exits_cleanly(tmp_path: Path, capsys) -> None:
    assert _generate(tmp_path / "nope", tmp_path / "x.npz", "--n", "1") == 2
    assert "no such model folder; give a model's folder, such as models/mnist-cgan" in capsys.readouterr().err
    assert _generate(Path("mnist-cgan"), tmp_path / "x.npz", "--n", "1") == 2  # a name, as the server takes
    assert "mnist-cgan: no such model folder; did you mean models/mnist-cgan?" in capsys.readouterr().err


def test_an_idx_labels_file_as_data_says_to_give_the_images_file(tmp_path: Path, capsys) -> None:
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(b"")
    assert main(["train", "--arch", "gan", "--data", str(labels), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "an IDX labels file; give the images file" in capsys.readouterr().err


def test_dataset_command_is_the_clients(server: tuple[str, int], tmp_path: Path) -> None:
    url, _ = server
    assert main(["dataset", "--server", url, "--model", "digits-gan", "--per-class", "2", "--seed", "1",
                 "--out", str(tmp_path / "d.zip")]) == 0
    assert load_dataset(str(tmp_path / "d.zip")).labels.tolist() == [i // 2 for i in range(20)]


def _train(out: Path, *args: str) -> int:
    return main(["train", "--arch", "gan", "--data", "digits", "--out", str(out), "--epochs", "1", "--device", "cpu",
                 "--quiet", *args])


@pytest.fixture(scope="module")
def cli_gan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a tiny GAN trained by the command line with class_weight 0.5, to resume."""
    out = tmp_path_factory.mktemp("cli") / "gan"
    assert _train(out, "--hparams", json.dumps({**TINY_GAN, "class_weight": 0.5})) == 0
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hparams", "{bad"], "--hparams is not valid JSON"),
        (["--hparams", "[1, 2]"], "--hparams must be a JSON object"),
        (["--hparams", '{"latent_dim": -3}'], "latent_dim = -3 is out of range"),
        (["--hparams", '{"g_channels": 0}'], "g_channels must be at least 1, not 0"),
        (["--hparams", '{"g_channels": 4000}'], "parameters, over the"),
        (["--lr", "0"], "--lr must be greater than 0"),
        (["--lr", "nan"], "--lr must be greater than 0"),
        (["--class-names", "a,a,b,c,d,e,f,g,h,i"], "class name 'a' (label 1)"),
        (["--class-names", "../evil,a,b,c,d,e,f,g,h,i"], "class name '../evil' (label 0)"),
        (["--data", "digits#0:9"], "--data has no training images of 2 of its 10 classes (4, 9)"),
    ],
)
def test_bad_training_arguments_exit_cleanly(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    assert _train(tmp_path / "m", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_resume_keeps_the_runs_hyperparameters(cli_gan: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gan"
    shutil.copytree(cli_gan, out)
    assert _train(out, "--hparams", '{"class_weight": 1.0}', "--resume", "--epochs", "2") == 2
    assert "--hparams differs: class_weight=1.0 (the run has 0.5)" in capsys.readouterr().err
    assert _train(out, "--resume", "--epochs", "2") == 0
    assert json.loads((out / "config.json").read_text())["hyperparameters"]["class_weight"] == 0.5
    assert json.loads((out / "card.json").read_text())["training"]["epochs_done"] == 2


def test_resume_on_other_data_or_a_changed_config_exits_cleanly(cli_gan: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gan"
    shutil.copytree(cli_gan, out)
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((40, 4, 4), np.uint8), labels=np.arange(40) % 10)
    assert main(["train", "--arch", "gan", "--data", str(small), "--out", str(out), "--epochs", "2", "--device",
                 "cpu", "--quiet", "--resume"]) == 2
    assert "was trained on data with height 8 (this data: 4), width 8 (this data: 4)" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    config["hyperparameters"]["latent_dim"] = 8  # no longer the shapes the training state holds
    (out / "config.json").write_text(json.dumps(config))
    assert _train(out, "--resume", "--epochs", "2") == 2
    assert "does not match the networks being resumed" in capsys.readouterr().err


def test_out_of_the_wrong_kind_exits_cleanly_before_sampling(tiny_gan: Path, tmp_path: Path, capsys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sampling(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampled before --out was checked")

    monkeypatch.setattr("app.core.sampling.sample", no_sampling)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.zip").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    for out, message in [("foo.txt", "use a .npz, .zip"), ("file", "file: is a file"),
                         ("dir.zip", "dir.zip: is a directory"), ("file/sub.npz", "is a file, not a directory"),
                         ("full", "the directory is not empty")]:
        assert _generate(tiny_gan, tmp_path / out, "--n", "2") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"synthgen generate: error: --out {tmp_path / out}") and message in err


def test_out_that_cannot_be_written_exits_cleanly(tiny_gan: Path, capsys) -> None:
    assert _generate(tiny_gan, Path("/proc/synthgen-test.npz"), "--n", "2") == 2
    assert "synthgen generate: error: --out /proc/synthgen-test.npz" in capsys.readouterr().err


def test_train_and_export_refuse_a_file_as_out(tiny_gan: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert _train(tmp_path / "file") == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_gan), "--n", "2", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-3"])
def test_export_refuses_a_shard_size_below_one(tiny_gan: Path, tmp_path: Path, capsys, size: str) -> None:
    assert main(["export", "--model", str(tiny_gan), "--n", "2", "--shard-size", size, "--out",
                 str(tmp_path / "shards")]) == 2
    assert f"the shard size must be at least 1 sample, not {size}" in capsys.readouterr().err
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_export_refuses_a_negative_seed(tiny_gan: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", "--model", str(tiny_gan), "--n", "2", "--seed", "-1", "--out", str(tmp_path / "s")]) == 2
    assert "seed must be in 0.." in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["protocol", "--data", "digits", "--test-data", "digits", "--per-class", "-3"],
        ["evaluate", "--data", "digits", "--per-class", "0"],
        ["tune", "--data", "digits", "--per-class", "0"],
    ],
)
def test_per_class_below_one_is_refused_up_front(tiny_gan: Path, capsys, args: list[str]) -> None:
    card = (tiny_gan / "card.json").read_bytes()
    assert main([*args, "--model", str(tiny_gan)]) == 2
    assert "--per-class must be at least 1" in capsys.readouterr().err
    assert (tiny_gan / "card.json").read_bytes() == card


@pytest.mark.parametrize(("command", "seeds"), [("protocol", "a,b"), ("protocol", ""), ("tune", "1,x")])
def test_seeds_that_are_not_numbers_exit_cleanly(tiny_gan: Path, capsys, command: str, seeds: str) -> None:
    extra = ["--test-data", "digits"] if command == "protocol" else []
    assert main([command, "--model", str(tiny_gan), "--data", "digits", *extra, "--seeds", seeds]) == 2
    assert f"--seeds takes comma-separated numbers, not {seeds!r}" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [(["serve", "--port", "99999"], "argument --port: 99999 is not a port"),
                                               (["serve", "--port", "-1"], "argument --port: -1 is not a port"),
                                               (["serve", "--port", "0"], "argument --port: 0 is not a port"),
                                               (["serve", "--port", "http"], "'http' is not a port number"),
                                               (["worker", "--metrics-port", "99999"], "argument --metrics-port")])
def test_ports_outside_1_to_65535_are_refused(capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("url", ["garbage", "mysql://user:secret@host/db", "postgres://user:secret@host/db"])
def test_database_urls_of_other_kinds_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                                  url: str) -> None:
    monkeypatch.setenv("SYNTHGEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SYNTHGEN_DATABASE_URL", url)
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert "SYNTHGEN_DATABASE_URL must be sqlite:///PATH or postgresql://" in err and "secret" not in err


def test_unreachable_database_exits_cleanly_without_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys) -> None:
    monkeypatch.setenv("SYNTHGEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SYNTHGEN_DATABASE_URL", "postgresql://user:secret@127.0.0.1:1/db")
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert "synthgen db: error: cannot use the jobs database postgresql+psycopg://user:***@127.0.0.1:1/db" in err
    assert "secret" not in err


@pytest.mark.parametrize(("env", "message"), [
    ({"SYNTHGEN_MAX_BATCH_SIZE": "0"}, "SYNTHGEN_MAX_BATCH_SIZE: Input should be greater than or equal to 1"),
    ({"SYNTHGEN_MAX_QUEUED_SAMPLES": "50"},  # a request of 51 to 10,000 samples would get 503 forever
     "SYNTHGEN_MAX_QUEUED_SAMPLES (50) must be at least SYNTHGEN_MAX_SAMPLES_PER_REQUEST (10000)"),
    ({"SYNTHGEN_WEBHOOK_ALLOW_HOSTS": "10.0.0.0/33"}, "'10.0.0.0/33' is not a network such as 10.0.0.0/8"),
    ({"SYNTHGEN_FORWARDED_ALLOW_IPS": "127.0.0.1,nginx"}, "'nginx' is not an address, a network such as"),
    ({"SYNTHGEN_ADMIN_API_KEYS": "an-admin-key-of-some-length,short"},
     "SYNTHGEN_ADMIN_API_KEYS: each API key must be at least 16 characters long"),
])
def test_bad_settings_name_their_variable_and_never_echo_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys, env: dict[str, str], message: str) -> None:
    monkeypatch.setenv("SYNTHGEN_DATA_DIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert message in err and "an-admin-key-of-some-length" not in err, err
