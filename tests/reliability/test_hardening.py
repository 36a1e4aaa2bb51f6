"""Issue 11, through the app: sizes admitted before allocating, tenancy, job admission, reloads under running work,
downloads racing deletes, bad model folders, hostile uploads and lax inputs. Each test failed on the code before."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.engine.archives import csv_cell
from tests.conftest import serve
from tests.helpers import png_bytes, wait_for_job, zip_bytes

pytestmark = pytest.mark.anyio
A, B, ADMIN = "a" * 20, "b" * 20, "c" * 20


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_sizes_are_admitted_before_anything_is_allocated(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        started = time.perf_counter()
        huge_job = await client.post("/v1/jobs", json={"model": "digits-gan", "per_class": 613423234})
        assert huge_job.status_code == 422 and "6134232340 samples is over the limit of 1000000" in huge_job.text
        for n in (10**10, 10**19, 10**30):
            response = await client.post("/v1/models/digits-gan/generate", json={"n": n})
            assert response.status_code == 422 and "SYNTHGEN_MAX_SAMPLES_PER_REQUEST" in response.json()["detail"]
        counts = await client.post("/v1/models/digits-gan/datasets", json={"per_class": {"1": 10**18, "2": 10**18}})
        assert counts.status_code == 422 and "over the limit" in counts.json()["detail"]
        assert time.perf_counter() - started < 5  # nothing was built first


async def test_hopeless_filters_stop_after_one_round(tmp_path: Path) -> None:
    from tests.conftest import copy_shipped

    async with serve(copy_shipped(tmp_path, "mnist-cvae"), filter_max_rounds=20) as client:
        client.app.state.repository.entries["mnist-cvae"].judge.threshold = 1e9  # type: ignore[attr-defined]
        response = await client.post("/v1/models/mnist-cvae/generate", json={"n": 2000, "max_similarity": True})
    assert response.status_code == 422
    assert "2000 candidates tried" in response.json()["detail"]  # one round, not 20 × 2000


@pytest.mark.parametrize("body", [{"n": True}, {"n": 2, "label": True}, {"n": 2, "label": " 7"},
                                  {"n": 2, "label": "٧"}, {"n": 2, "label": "07"}, {"n": "2"}, {"n": 2.0},
                                  {"n": 2, "truncation": True}, {"n": 2, "truncation": "1"}])
async def test_numbers_booleans_and_labels_are_strict(models_dir: Path, body: dict) -> None:
    async with serve(models_dir) as client:
        response = await client.post("/v1/models/digits-gan/generate", json=body)
    assert response.status_code == 422, (body, response.text)


async def test_per_class_naming_a_class_twice_is_refused(tmp_path: Path) -> None:
    from tests.conftest import copy_shipped

    async with serve(copy_shipped(tmp_path, "mnist-cgan")) as client:
        names = (await client.get("/v1/models/mnist-cgan")).json()["class_names"]
        twice = await client.post("/v1/models/mnist-cgan/datasets", json={"per_class": {names[7]: 1, "7": 1}})
        assert names[7] == "7" and twice.status_code == 200  # the same key twice is one JSON key
        zeros = await client.post("/v1/models/mnist-cgan/datasets", json={"per_class": {"7": 1, "07": 1}})
        assert zeros.status_code == 422 and "unknown label '07'" in zeros.json()["detail"]


async def test_jobs_belong_to_their_key_and_models_to_admins(models_dir: Path) -> None:
    async with serve(models_dir, api_keys=[A, B], admin_api_keys=[ADMIN]) as client:
        submitted = await client.post("/v1/jobs", json={"model": "digits-gan", "n": 20, "seed": 1}, headers=auth(A))
        job = await wait_for_job(client, submitted.json()["id"], ("succeeded",), auth(A))
        for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("GET", f"/v1/jobs/{job['id']}/result"),
                             ("DELETE", f"/v1/jobs/{job['id']}")):
            other = await client.request(method, path, headers=auth(B))
            assert other.status_code == 404 and "no job" in other.json()["detail"], (method, path)
        assert [j["id"] for j in (await client.get("/v1/jobs", headers=auth(A))).json()["jobs"]] == [job["id"]]
        assert (await client.get("/v1/jobs", headers=auth(B))).json()["jobs"] == []
        assert (await client.get(job["result_url"], headers=auth(A))).status_code == 200  # still there
        for method, path in (("POST", "/v1/models/digits-gan/load"), ("DELETE", "/v1/models/digits-gan")):
            refused = await client.request(method, path, headers=auth(A))
            assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        assert (await client.post("/v1/models/digits-gan/load", headers=auth(ADMIN))).status_code == 200


async def test_a_model_trained_through_the_api_is_its_key_s_and_the_admins(models_dir: Path) -> None:
    from app.api.deps import key_fingerprint

    version = models_dir.parent / "data" / "models" / "secret" / "1"  # as a training by key A leaves it
    shutil.copytree(models_dir / "digits-gan", version)
    config = json.loads((version / "config.json").read_text())
    (version / "config.json").write_text(json.dumps({**config, "trained_by": key_fingerprint(A), "training_job": "j1"}))
    shared = models_dir / "digits-vae" / "config.json"  # a repository model that says who trained it
    shared.write_text(json.dumps({**json.loads(shared.read_text()), "trained_by": key_fingerprint(A)}))
    async with serve(models_dir, api_keys=[A, B], admin_api_keys=[ADMIN]) as client:
        for key in (A, ADMIN):
            assert "secret" in [m["name"] for m in (await client.get("/v1/models", headers=auth(key))).json()["models"]]
            described = await client.get("/v1/models/secret", headers=auth(key))
            assert described.status_code == 200 and described.json()["config"]["trained_by"] == key_fingerprint(A)
            generated = await client.post("/v1/models/secret@1/generate", json={"n": 1}, headers=auth(key))
            assert generated.status_code == 200
        listed = (await client.get("/v1/models", headers=auth(B))).json()["models"]
        assert [m["name"] for m in listed] == ["digits-gan", "digits-vae"]
        for method, path, body in (
                ("GET", "/v1/models/secret", None), ("GET", "/v1/models/secret@1", None),
                ("GET", "/v1/models/secret/card?format=html", None), ("GET", "/v1/models/secret/card", None),
                ("POST", "/v1/models/secret/generate", {"n": 1}), ("POST", "/v1/models/secret@1/generate", {"n": 1}),
                ("POST", "/v1/models/secret/generate", {"n": 1, "colour": "red"}),  # not the fast lane
                ("POST", "/v1/models/secret/datasets", {"n": 2, "format": "npz"}),
                ("POST", "/v1/models/secret/interpolate", {"seed_a": 0, "seed_b": 1}),
                ("POST", "/v1/jobs", {"model": "secret", "n": 2})):
            other = await client.request(method, path, json=body, headers=auth(B))
            if "colour" in (body or {}):
                assert other.status_code == 422, other.text  # body validation answers first, as for any model
                continue
            assert other.status_code == 404 and "no model named" in other.json()["detail"], (method, path, other.text)
        public = (await client.get("/v1/models/digits-vae", headers=auth(B))).json()["config"]
        assert "trained_by" not in public and "latent_dim" in public
        ready = (await client.get("/readyz")).json()  # anyone may ask: the trained version is not named there
        assert "secret@1" not in ready["models"] and "digits-gan" in ready["models"]
        assert not any("secret" in problem for problem in ready["problems"])
        metrics = (await client.get("/metrics")).text  # nor in the metrics, which need no key either
        assert "secret" not in metrics and 'model="trained-' in metrics and 'model="digits-gan"' in metrics


async def test_open_mode_is_said_at_start_up(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with serve(models_dir):
        pass
    assert "no API keys are configured" in caplog.text


async def test_a_missing_model_repository_is_said_at_start_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with serve(tmp_path / "no-such-folder") as client:
        assert (await client.get("/readyz")).status_code == 503
    assert "no-such-folder does not exist (SYNTHGEN_MODELS_DIR)" in caplog.text


async def test_failed_authentications_are_rate_limited(models_dir: Path) -> None:
    async with serve(models_dir, api_keys=[A]) as client:
        statuses = [(await client.get("/v1/models", headers=auth("x" * 20))).status_code for _ in range(12)]
        assert statuses[:10] == [403] * 10 and statuses[10:] == [429, 429]
        # a guess while limited is not even tried: the right key is refused too until the bucket refills
        assert (await client.get("/v1/models", headers=auth(A))).status_code == 429


async def test_job_queue_and_quotas_are_enforced_at_submission(models_dir: Path) -> None:
    async with serve(models_dir, jobs_quota_bytes=200_000, max_batch_size=8) as client:
        # 20 concurrent submissions of ~17 kB each: those that fit the quota are admitted, the rest get 507 now
        answers = await asyncio.gather(*(client.post("/v1/jobs", json={"model": "digits-gan", "n": 100, "seed": i})
                                         for i in range(20)))
        admitted = [a.json()["id"] for a in answers if a.status_code == 202]
        assert {a.status_code for a in answers} == {202, 507} and 0 < len(admitted) < 20
        assert all("quota" in a.json()["detail"] for a in answers if a.status_code == 507)
        finished = [await wait_for_job(client, job_id, ("succeeded", "failed")) for job_id in admitted]
        assert all(job["state"] == "succeeded" for job in finished)  # none admitted fails later
    async with serve(models_dir, max_queued_jobs=3, max_batch_size=8) as client:
        answers = [await client.post("/v1/jobs", json={"model": "digits-gan", "n": 100_000}) for _ in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 429]
        assert "SYNTHGEN_MAX_QUEUED_JOBS" in answers[-1].json()["detail"] and answers[-1].headers["retry-after"]
    async with serve(models_dir, api_keys=[A, B], max_queued_jobs_per_key=1, max_batch_size=8) as client:
        assert (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 100_000}, headers=auth(A))
                ).status_code == 202
        assert (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 10}, headers=auth(A))
                ).status_code == 429
        assert (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 10}, headers=auth(B))
                ).status_code == 202  # another key is not affected


async def test_reload_keeps_running_exports_and_jobs_and_unload_fails_them_at_once(models_dir: Path) -> None:
    async with serve(models_dir, max_batch_size=16) as client:
        job = (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 3000, "seed": 2})).json()
        async with client.stream("POST", "/v1/models/digits-gan/datasets", json={"n": 3000, "seed": 2}) as export:
            stream = export.aiter_bytes()
            chunks = [await anext(stream)]
            assert (await client.post("/v1/models/digits-gan/load")).status_code == 200  # a reload mid-export
            chunks += [chunk async for chunk in stream]
        archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
        assert len([n for n in archive.namelist() if n.endswith(".png")]) == 3000
        assert (await wait_for_job(client, job["id"], ("succeeded", "failed")))["state"] == "succeeded"

        job = (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 200_000})).json()
        await wait_for_job(client, job["id"], ("running",))
        started = time.perf_counter()
        assert (await client.delete("/v1/models/digits-gan")).status_code == 200
        failed = await wait_for_job(client, job["id"], ("failed", "succeeded"))
        assert failed["state"] == "failed" and "unloaded" in failed["error"] and time.perf_counter() - started < 5
        gone = await client.post("/v1/models/digits-gan/generate", json={"n": 2})
        assert gone.status_code == 409


async def test_a_download_survives_the_delete_of_its_job(models_dir: Path) -> None:
    async with serve(models_dir) as client:
        job = (await client.post("/v1/jobs", json={"model": "digits-gan", "n": 2000, "format": "zip"})).json()
        job = await wait_for_job(client, job["id"], ("succeeded",))
        async with client.stream("GET", job["result_url"]) as download:
            chunks = download.aiter_raw(65536)
            first = await anext(chunks)
            assert (await client.delete(f"/v1/jobs/{job['id']}")).status_code == 204
            rest = b"".join([chunk async for chunk in chunks])
        assert len(first) + len(rest) == job["result_bytes"] == int(download.headers["content-length"])
        after = await client.get(job["result_url"])
        assert after.status_code == 404 and after.headers["content-type"] == "application/json"
        # the file gone while the job still says succeeded (another replica expiring it): 404, not a 500
        submitted = await client.post("/v1/jobs", json={"model": "digits-gan", "n": 5})
        other = await wait_for_job(client, submitted.json()["id"], ("succeeded",))
        store = client.app.state.jobs  # type: ignore[attr-defined]
        shutil.rmtree(store.storage.root / other["id"])
        vanished = await client.get(other["result_url"])
        assert vanished.status_code == 404 and "deleted or expired" in vanished.json()["detail"]


async def test_a_bad_model_folder_fails_only_that_model(models_dir: Path) -> None:
    broken = models_dir / "broken-gan"
    import shutil

    shutil.copytree(models_dir / "digits-gan", broken)
    config = json.loads((broken / "config.json").read_text())
    config["hyperparameters"]["latent_dim"] = "sixteen"
    (broken / "config.json").write_text(json.dumps(config))
    async with serve(models_dir) as client:
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert models["broken-gan"]["status"] == "failed" and models["digits-gan"]["status"] == "ready"
        assert "hyperparameter latent_dim must be int, not 'sixteen'" in models["broken-gan"]["error"]
        reload = await client.post("/v1/models/broken-gan/load")
        assert reload.status_code == 409 and reload.headers["content-type"] == "application/json"
        assert (await client.get("/v1/models/broken-gan")).json()["status"] == "failed"  # not "loading" forever
        ready = await client.get("/readyz")
        for answer in (models["broken-gan"]["error"], reload.text, ready.text):
            assert str(models_dir) not in answer and str(models_dir.resolve()) not in answer  # no server paths


def _flat_upload(class_name: str) -> bytes:
    image = png_bytes(np.zeros((28, 28), np.uint8))
    return zip_bytes({"x.png": image, "labels.csv": f"file_name,class_name\nx.png,{class_name}\n".encode()})


@pytest.mark.parametrize("class_name", ["../../../tmp/evil", "/etc/cron.d/x", '""', "..", ".hidden",
                                        "=HYPERLINK(\"http://x\")", '"a\nb"', "C:evil"])
async def test_hostile_class_names_are_refused(tmp_path: Path, class_name: str) -> None:
    from tests.conftest import copy_shipped

    async with serve(copy_shipped(tmp_path, "mnist-cgan")) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", _flat_upload(class_name))},
                                     data={"model": "mnist-cgan"})
    assert response.status_code == 422, response.text
    assert "class name" in response.json()["detail"] or "labels.csv" in response.json()["detail"]


def test_csv_cells_that_spreadsheets_would_run_are_escaped() -> None:
    assert [csv_cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "7", "Ankle boot", 3)] == \
        ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "7", "Ankle boot", 3]


async def test_sixteen_bit_images_are_scaled_not_clipped(models_dir: Path) -> None:
    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey at 16 bits
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    async with serve(models_dir) as client:
        response = await client.post("/v1/models/digits-vae/reconstruct", data={"format": "npz", "labels": "1"},
                                     files={"files": ("grey16.png", buffer.getvalue())})
    assert response.status_code == 200, response.text
    from app.core.images import decode_to_shape

    assert int(decode_to_shape(buffer.getvalue(), "g", (8, 8, 1), "m", False)[0, 0, 0]) == 128  # not 255


async def test_many_small_zip_bombs_are_refused_early(tmp_path: Path) -> None:
    from tests.conftest import copy_shipped

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(200):  # 200 MiB of zeros in 1 MiB members, about 200 kB compressed
            archive.writestr(f"0/{i}.png", bytes(1 << 20))
    async with serve(copy_shipped(tmp_path, "mnist-cgan")) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", buffer.getvalue())},
                                     data={"model": "mnist-cgan"})
    assert response.status_code == 422 and "zip bombs are refused" in response.json()["detail"]


async def test_uploads_per_client_are_bounded(tmp_path: Path) -> None:
    from tests.conftest import copy_shipped

    images = {f"{label}/{i}.png": png_bytes(np.zeros((28, 28), np.uint8)) for label in range(10) for i in range(20)}
    upload = zip_bytes(images)
    async with serve(copy_shipped(tmp_path, "mnist-cgan"), max_uploads_per_client=2) as client:
        answers = await asyncio.gather(*(client.post("/v1/augment", files={"dataset": ("d.zip", upload)},
                                                     data={"model": "mnist-cgan", "target_per_class": "300"})
                                         for _ in range(6)))
    statuses = sorted(a.status_code for a in answers)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    refused = next(a for a in answers if a.status_code == 429)
    assert "SYNTHGEN_MAX_UPLOADS_PER_CLIENT" in refused.json()["detail"] and refused.headers["retry-after"]


@pytest.mark.parametrize("field", [("seed", " 7"), ("seed", "07"), ("seed", "7.0"), ("seed", "1_000"),
                                   ("convert", "yes"), ("convert", "1"), ("target_per_class", "+5")])
async def test_form_numbers_and_booleans_are_strict(tmp_path: Path, field: tuple[str, str]) -> None:
    from tests.conftest import copy_shipped

    async with serve(copy_shipped(tmp_path, "mnist-cgan")) as client:
        response = await client.post("/v1/augment", files={"dataset": ("d.zip", _flat_upload("7"))},
                                     data={"model": "mnist-cgan", field[0]: field[1]})
    assert response.status_code == 422 and field[0] in response.json()["detail"], response.text


async def test_an_upload_is_authenticated_before_its_body_is_read(tmp_path: Path) -> None:
    from tests.conftest import copy_shipped

    upload = zip_bytes({f"{label}/{i}.png": png_bytes(np.zeros((28, 28), np.uint8)) for label in range(10)
                        for i in range(5)})
    assert len(upload) > 1024
    async with serve(copy_shipped(tmp_path, "mnist-cgan"), api_keys="the-key-of-16-chars",
                     max_upload_bytes=1024) as client:
        answers = [await client.post("/v1/augment", files={"dataset": ("d.zip", upload)}, data={"model": "mnist-cgan"},
                                     headers=headers) for headers in ({"Authorization": "Bearer made-up"}, {})]
    # not 413 for the body over the limit: a made-up key neither holds an upload slot nor has its body read
    assert [a.status_code for a in answers] == [403, 401], [a.text for a in answers]
    assert answers[0].headers["x-request-id"] and "not valid" in answers[0].json()["detail"]
