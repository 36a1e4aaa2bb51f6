import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.core.model import load_model
from app.core.nets.gan import Generator
from app.core.sampling import sample
from app.errors import CheckpointError


def test_round_trip_is_bit_identical(tiny_gan: Path, tiny_vae: Path) -> None:
    for folder, role in ((tiny_gan, "generator"), (tiny_vae, "decoder")):
        model = load_model(folder)
        saved = load_file(str(folder / f"{role}.safetensors"))
        net = getattr(model.net, role)
        for key, value in net.state_dict().items():
            assert torch.equal(value, saved[key]), key
        first, _ = sample(model, 3, [1, 2, None])
        second, _ = sample(load_model(folder), 3, [1, 2, None])
        assert first.tobytes() == second.tobytes()


def test_config_describes_the_model(tiny_gan: Path) -> None:
    config = json.loads((tiny_gan / "config.json").read_text())
    assert config["format_version"] == 1 and config["class_name"] == "ConditionalGAN"
    assert config["image"] == {"height": 8, "width": 8, "channels": 1}
    assert config["class_names"] == [str(i) for i in range(10)]
    assert config["training_data"]["fingerprint"].startswith("sha256:")
    text = (tiny_gan / "config.json").read_text()
    assert text == json.dumps(config, sort_keys=True, indent=2) + "\n"


@pytest.fixture
def gan_copy(tiny_gan: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_gan, tmp_path / "copy"))


def _without_digests(folder: Path) -> None:
    """A config without weight digests (as before they were recorded): the file checks below are the last line."""
    config = json.loads((folder / "config.json").read_text())
    del config["sha256"]
    (folder / "config.json").write_text(json.dumps(config))


def test_refuses_weights_whose_sha256_differs(gan_copy: Path, tiny_vae: Path) -> None:
    shutil.copy(tiny_vae / "decoder.safetensors", gan_copy / "generator.safetensors")  # a valid file, another net
    with pytest.raises(CheckpointError, match="generator.safetensors: its sha256 is not the one config.json records"):
        load_model(gan_copy)


def test_refuses_pickled_weights(gan_copy: Path) -> None:
    _without_digests(gan_copy)
    buffer = io.BytesIO()
    torch.save(Generator(load_model(gan_copy).net.cfg).state_dict(), buffer)  # a pickle, as torch.save writes
    (gan_copy / "generator.safetensors").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="generator.safetensors: not a valid .safetensors"):
        load_model(gan_copy)


def test_refuses_truncated_weights(gan_copy: Path) -> None:
    weights = gan_copy / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="generator.safetensors"):
        load_model(gan_copy)


def test_refuses_mismatched_weights(gan_copy: Path, tiny_vae: Path) -> None:
    _without_digests(gan_copy)
    shutil.copy(tiny_vae / "decoder.safetensors", gan_copy / "generator.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \[.*project.*\], unexpected keys"):
        load_model(gan_copy)


def test_refuses_config_that_does_not_match_shapes(gan_copy: Path) -> None:
    config = json.loads((gan_copy / "config.json").read_text())
    config["hyperparameters"]["latent_dim"] = 99
    (gan_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_model(gan_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format_version=7), "format_version 7"),
        (lambda c: c.update(class_name="Evil"), "unknown class_name"),
        (lambda c: c["hyperparameters"].update(bogus=1), r"unknown hyperparameters \['bogus'\]"),
        (lambda c: c["hyperparameters"].update(latent_dim=True), "hyperparameter latent_dim must be int, not True"),
        (lambda c: c["hyperparameters"].update(embed_dim=-100), "do not build a ConditionalGAN"),
        (lambda c: c["hyperparameters"].update(latent_scale=0.0), r"latent_scale must be in \(0, 4\]"),
        (lambda c: c.update(class_names=["a"]), "class_names"),
        (lambda c: c["class_names"].__setitem__(0, "../../escaped"), "not '../../escaped'"),  # a folder in exports
        (lambda c: c["class_names"].__setitem__(0, 7), "not 7"),
        (lambda c: c["class_names"].__setitem__(0, c["class_names"][1]), "must be distinct"),
        # checked against the weights' headers on the meta device: nothing near the 10^11 floats is allocated
        (lambda c: c["hyperparameters"].update(g_channels=100_000), "shapes do not match"),
    ],
)
def test_refuses_bad_config(gan_copy: Path, edit, message: str) -> None:
    config = json.loads((gan_copy / "config.json").read_text())
    edit(config)
    (gan_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(gan_copy)


def test_refuses_missing_and_broken_files(gan_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "nothing")
    (gan_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(gan_copy)
    (gan_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_model(gan_copy)
