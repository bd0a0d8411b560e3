"""deploy/'s Kubernetes example: every manifest valid against the Kubernetes JSON
schemas (bundled by kubernetes-validate, offline, strict: unknown fields fail), the
kvbm.yaml in its ConfigMap valid for kvbm's own loader, the connector named in the
vLLM arguments importable, and the pieces pointing at each other."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kvbm.config import load_settings, tier_names, validate_tier
from kvbm.plugins import build_plugins

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_VERSION = "1.30.0"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def kind(k: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == k
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{k} {name}: {len(found)} found"
    return found[0]


def vllm_container() -> dict[str, Any]:
    pod = kind("StatefulSet")["spec"]["template"]["spec"]
    return [c for c in pod["containers"] if c["name"] == "vllm"][0]


def kv_transfer_config() -> dict[str, Any]:
    args = vllm_container()["args"]
    return dict(json.loads(args[args.index("--kv-transfer-config") + 1]))


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_example_has_vllm_an_s3_store_a_config_map_and_a_secret() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for _, d in documents())
    assert kinds == [("ConfigMap", "kvbm-config"), ("Deployment", "minio"),
                     ("PersistentVolumeClaim", "minio-data"), ("Secret", "kvbm-s3"),
                     ("Service", "minio"), ("Service", "vllm-kvbm"),
                     ("StatefulSet", "vllm-kvbm")]


@pytest.mark.parametrize("name,doc", documents(),
                         ids=[f"{f}:{d['kind']}" for f, d in documents()])
def test_every_manifest_is_valid_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    validate(doc)


def test_a_misspelt_field_fails_the_schema_check() -> None:
    """Negative control: strict validation catches what kubectl would refuse."""
    sts = copy.deepcopy(kind("StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(sts)
    wrong_type = copy.deepcopy(kind("Service", "minio"))
    wrong_type["spec"]["ports"][0]["port"] = "nine thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong_type)


def kvbm_yaml() -> str:
    return str(kind("ConfigMap", "kvbm-config")["data"]["kvbm.yaml"])


def test_the_config_maps_kvbm_yaml_is_valid_for_kvbms_loader(tmp_path: Path) -> None:
    p = tmp_path / "kvbm.yaml"
    p.write_text(kvbm_yaml())
    settings = load_settings(p)
    plugins = build_plugins()
    # Each tier's own model checks its keys (the chain is not built: its sizes are the
    # pod's, not this machine's).
    for spec, name in zip(settings.tiers, tier_names(settings.tiers)):
        validate_tier(spec, name, plugins.tiers.get(spec.type).config_model)
    assert [t.type for t in settings.tiers] == ["host", "disk", "s3"]


def test_a_bad_key_in_the_kvbm_yaml_would_be_caught(tmp_path: Path) -> None:
    """Negative control for the check above."""
    from kvbm.errors import ConfigError

    p = tmp_path / "kvbm.yaml"
    p.write_text(kvbm_yaml().replace("create_bucket:", "create_bukket:"))
    settings = load_settings(p)
    plugins = build_plugins()
    with pytest.raises(ConfigError, match="create_bukket"):
        for spec, name in zip(settings.tiers, tier_names(settings.tiers)):
            validate_tier(spec, name, plugins.tiers.get(spec.type).config_model)


def test_the_connector_named_in_the_vllm_arguments_imports() -> None:
    pytest.importorskip("vllm")
    cfg = kv_transfer_config()
    module = importlib.import_module(cfg["kv_connector_module_path"])
    cls = getattr(module, cfg["kv_connector"])
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert issubclass(cls, KVConnectorBase_V1)
    assert cfg["kv_role"] == "kv_both"


def test_kvbm_config_points_at_the_mounted_config_map() -> None:
    c = vllm_container()
    env = {e["name"]: e.get("value") for e in c["env"]}
    mount = [m for m in c["volumeMounts"] if m["name"] == "kvbm-config"][0]
    assert env["KVBM_CONFIG"] == f"{mount['mountPath']}/kvbm.yaml"
    pod = kind("StatefulSet")["spec"]["template"]["spec"]
    vol = [v for v in pod["volumes"] if v["name"] == "kvbm-config"][0]
    assert vol["configMap"]["name"] == "kvbm-config"


def test_the_disk_tier_lives_on_the_pods_own_volume() -> None:
    disk = [t for t in yaml.safe_load(kvbm_yaml())["tiers"] if t["type"] == "disk"][0]
    mounts = {m["mountPath"]: m["name"] for m in vllm_container()["volumeMounts"]}
    claims = [t["metadata"]["name"] for t in kind("StatefulSet")["spec"]["volumeClaimTemplates"]]
    assert mounts[disk["path"]] in claims


def test_the_s3_tier_points_at_the_minio_service() -> None:
    s3 = [t for t in yaml.safe_load(kvbm_yaml())["tiers"] if t["type"] == "s3"][0]
    url = urlsplit(s3["endpoint_url"])
    svc = kind("Service", "minio")
    assert url.hostname == svc["metadata"]["name"]
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]


def test_prometheus_scrapes_the_vllm_containers_metrics_port() -> None:
    notes = kind("StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    ports = [p["containerPort"] for p in vllm_container()["ports"]]
    assert int(notes["prometheus.io/port"]) in ports
    assert notes["prometheus.io/path"] == "/metrics"


def test_the_s3_credentials_come_from_the_secret_and_nothing_kvbm_refuses() -> None:
    secret = kind("Secret", "kvbm-s3")
    for e in vllm_container()["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "kvbm-s3" and ref["key"] in secret["stringData"]
        # kvbm refuses KVBM_* variables it does not read: only KVBM_CONFIG is set.
        assert not e["name"].startswith("KVBM_") or e["name"] == "KVBM_CONFIG"
