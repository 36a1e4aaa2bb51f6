"""The Kubernetes manifests (deploy/k8s, a kustomize base): every core object valid against the Kubernetes schema
(kubernetes-validate, strict), the custom resources (KEDA, KubeRay) shaped as their operators expect, and every
reference between them resolved."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"


def _objects() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files  # nothing left out of the base, nothing missing
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _pod_specs(objects: list[dict]) -> list[dict]:
    specs = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            specs.append(obj["spec"]["template"]["spec"])
        if obj["kind"] in ("RayJob", "RayService"):
            cluster = obj["spec"]["rayClusterSpec" if obj["kind"] == "RayJob" else "rayClusterConfig"]
            specs += [cluster["headGroupSpec"]["template"]["spec"],
                      *(group["template"]["spec"] for group in cluster["workerGroupSpecs"])]
    return specs


def test_core_objects_are_valid_kubernetes() -> None:
    core = [obj for obj in _objects() if "." not in obj["apiVersion"].split("/")[0] or obj["apiVersion"].startswith(
        ("apps/", "batch/", "policy/"))]
    assert {obj["kind"] for obj in core} >= {"Deployment", "Service", "Job", "ConfigMap", "Secret",
                                             "PodDisruptionBudget", "PersistentVolumeClaim", "Namespace"}
    for obj in core:
        kubernetes_validate.validate(obj, VERSION, strict=True)


def test_references_resolve_and_pods_are_configured_for_production() -> None:
    objects = _objects()
    named = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    deployments = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Deployment"}
    for spec in _pod_specs(objects):
        for container in spec["containers"]:
            assert container["image"] in ("synthgen", "synthgen-ray")
            assert "memory" in container["resources"]["limits"]
            for source in container.get("envFrom", []):
                kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else (
                    "Secret", source["secretRef"])
                assert (kind, ref["name"]) in named
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in named
    api = deployments["synthgen-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--no-jobs" in api["command"]
    for name in ("synthgen-api", "synthgen-worker"):
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        # trainings: the API stores uploads a worker trains on, and serves the models the worker promotes
        volumes = {v["name"]: v for v in deployments[name]["spec"]["template"]["spec"]["volumes"]}
        shared = {m["mountPath"] for m in container["volumeMounts"]
                  if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == "synthgen-trainings"}
        assert shared == {"/data/datasets", "/data/trainings", "/data/models"}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "SYNTHGEN_REPLICA_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in \
            container["env"]  # every pod names its workers apart in the job store
    for obj in objects:
        if obj["kind"] == "PodDisruptionBudget":
            labels = deployments[obj["metadata"]["name"]]["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
    secret = next(obj for obj in objects if obj["kind"] == "Secret")
    assert all("change-me" in value for value in secret["stringData"].values())  # placeholders, never real secrets


def test_keda_scales_on_the_servers_own_metrics_and_rayjob_runs_the_sharded_export() -> None:
    objects = _objects()
    deployments = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "Deployment"}
    scaled = {obj["spec"]["scaleTargetRef"]["name"]: obj for obj in objects if obj["kind"] == "ScaledObject"}
    assert set(scaled) == {"synthgen-api", "synthgen-worker"} <= deployments
    assert 'synthgen_jobs{state="queued"}' in scaled["synthgen-worker"]["spec"]["triggers"][0]["metadata"]["query"]
    assert "synthgen_queued_samples" in scaled["synthgen-api"]["spec"]["triggers"][0]["metadata"]["query"]
    rayjob = next(obj for obj in objects if obj["kind"] == "RayJob")
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["spec"]["entrypoint"].startswith("synthgen export ") and "--ray auto" in rayjob["spec"]["entrypoint"]
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_rayservice_runs_the_serve_builder_of_this_package() -> None:
    import importlib

    service = next(obj for obj in _objects() if obj["kind"] == "RayService")
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    module, _, name = application["import_path"].partition(":")
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
    build = getattr(importlib.import_module(module), name)
    assert application["route_prefix"] == "/" and {"models_dir", "num_gpus"} <= set(application["args"])
    assert type(build(application["args"])).__name__ == "Application"  # the args are valid options and settings
