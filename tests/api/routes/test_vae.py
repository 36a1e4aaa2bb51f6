"""VAE operations over HTTP: reconstruct, interpolate, inpaint; GANs refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import serve
from tests.helpers import npz_arrays, png_bytes, png_metadata_bomb

pytestmark = pytest.mark.anyio


async def test_vae_routes(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        images, _ = npz_arrays(await client.post("/v1/models/digits-vae/generate",
                                           json={"n": 3, "seed": 2, "label": 5, "format": "npz"}))
        files = [("files", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]
        recon, labels = npz_arrays(await client.post("/v1/models/digits-vae/reconstruct", files=files,
                                               data={"format": "npz", "labels": "5"}))
        assert recon.shape == (3, 8, 8) and labels.tolist() == [5, 5, 5]
        inferred = await client.post("/v1/models/digits-vae/reconstruct", files=files, data={"format": "json"})
        assert len(inferred.json()["samples"]) == 3
        path, _ = npz_arrays(await client.post("/v1/models/digits-vae/interpolate",
                                         json={"seed_a": 0, "seed_b": 1, "label_a": 3, "label_b": 8, "steps": 5,
                                               "format": "npz"}))
        assert path.shape == (5, 8, 8)
        mask = np.zeros((8, 8), np.uint8)
        mask[:, 4:] = 255
        filled, _ = npz_arrays(await client.post("/v1/models/digits-vae/inpaint", data={"format": "npz", "label": "5"},
                                           files={"image": ("x.png", png_bytes(images[0]), "image/png"),
                                                  "mask": ("m.png", png_bytes(mask), "image/png")}))
        assert np.array_equal(filled[0][:, :4], images[0][:, :4])  # known pixels are kept
        gan = await client.post("/v1/models/digits-gan/interpolate", json={"steps": 3})
        assert gan.status_code == 409 and "need a VAE" in gan.json()["detail"]
        big = await client.post("/v1/models/digits-vae/reconstruct",
                                files=[("files", ("big.png", png_bytes(np.zeros((9, 9), np.uint8)), "image/png"))])
        assert big.status_code == 422 and "convert=true" in big.json()["detail"]
        junk = await client.post("/v1/models/digits-vae/reconstruct",
                                 files=[("files", ("a.png", b"nope", "image/png"))])
        assert junk.status_code == 422 and "not a readable" in junk.json()["detail"]


@pytest.mark.parametrize(("path", "parts"), [("/v1/models/digits-vae/reconstruct", "-F 'files=@digit.png'"),
                                             ("/v1/models/digits-vae/inpaint", "-F 'image=@digit.png' -F 'mask="),
                                             ("/v1/augment", "-F 'dataset=@data.zip'"),
                                             ("/v1/trainings", "-F 'dataset=@data.zip'")])
@pytest.mark.parametrize("body", [{"json": {"labels": "3"}}, {"data": {"labels": "3"}}, {"content": b"raw"}])
async def test_upload_routes_want_multipart(models_dir: Path, path: str, parts: str, body: dict) -> None:
    async with serve(models_dir) as client:
        response = await client.post(path, **body)
    if path == "/v1/trainings" and "data" in body:  # a form without a file names an earlier upload: fields checked
        assert response.status_code == 422 and "name: Field required" in response.json()["detail"], response.text
    else:  # not 'dataset: Field required' or 'Expected UploadFile': how to send it, with the route's own parts
        assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"], response.text
        assert f"(curl {parts}" in response.json()["detail"]


async def test_a_part_sent_twice_is_refused_unless_the_route_takes_several(models_dir: Path) -> None:
    digit = png_bytes(np.zeros((8, 8), np.uint8))
    async with serve(models_dir) as client:
        twice = await client.post("/v1/models/digits-vae/inpaint", files=[("image", ("a.png", digit)),
                                                                          ("image", ("b.png", digit)),
                                                                          ("mask", ("m.png", digit))])
        assert twice.status_code == 422 and twice.json()["detail"] == "image is sent 2 times; send it once"
        several = await client.post("/v1/models/digits-vae/reconstruct", files=[("files", ("a.png", digit)),
                                                                                ("files", ("b.png", digit))],
                                    data={"format": "npz"})
        assert several.status_code == 200, several.text


async def test_metadata_bombs_get_422_naming_the_file(models_dir: Path) -> None:
    bomb, plain = png_metadata_bomb(b"zTXt"), png_bytes(np.zeros((8, 8), np.uint8))
    async with serve(models_dir) as client:
        recon = await client.post("/v1/models/digits-vae/reconstruct",
                                  files=[("files", ("bomb.png", png_metadata_bomb(b"iCCP"), "image/png"))])
        inpaint = await client.post("/v1/models/digits-vae/inpaint", files={"image": ("x.png", plain, "image/png"),
                                                                           "mask": ("m.png", bomb, "image/png")})
    for answer, name in ((recon, "bomb.png"), (inpaint, "m.png")):
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith(f"{name}: a text or colour-profile")
