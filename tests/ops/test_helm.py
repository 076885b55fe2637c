"""The Helm chart, rendered offline by scripts/helm_lint.py in the Python 3.12 venv `.venv-helm`.

`make lint-helm` (a prerequisite of `make test`) creates that venv; without it these tests skip locally and
fail in CI (CI=true).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.config import Settings
from tests.conftest import ROOT, require_service
from tests.pki import Pki
from tests.service.security.support import new_ec_key

HELM_PY = ROOT / ".venv-helm" / "bin" / "python"
SCRIPT = ROOT / "scripts" / "helm_lint.py"
PRODUCTION = ROOT / "helm" / "values-production.yaml"
QUEUES = ("ingest", "evaluate", "writeback")
FULLNAME = "cds-calcinosis-cds"  # release "cds" + chart name


def _helm_available() -> tuple[bool, str]:
    if not HELM_PY.exists():
        return False, f"{HELM_PY.relative_to(ROOT)} is missing (run `make lint-helm`)"
    probe = subprocess.run([str(HELM_PY), "-c", "import helm_python, helm_sdkpy"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"helm libraries not importable in .venv-helm: {probe.stderr.strip()[-300:]}"
    return True, ""


def render(*values: Path, set_json: dict[str, Any] | None = None, check: bool = True) -> list[dict[str, Any]]:
    ok, why = _helm_available()
    require_service("helm renderer (.venv-helm)", ok, why)
    cmd = [str(HELM_PY), str(SCRIPT), "render"]
    for path in values:
        cmd += ["-f", str(path)]
    if set_json is not None:
        cmd += ["--set-json", json.dumps(set_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if not check:
        return [{"returncode": proc.returncode, "stderr": proc.stderr}]
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def render_fails(set_json: dict[str, Any]) -> str:
    result = render(set_json=set_json, check=False)[0]
    assert result["returncode"] != 0, f"values were accepted: {set_json}"
    return str(result["stderr"])


@pytest.fixture(scope="module", params=["default", "production"])
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render() if request.param == "default" else render(PRODUCTION)


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render(PRODUCTION)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def _workers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The worker Deployments (there is always at least one: a loop over none would check nothing)."""
    found = [d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    assert found, "no worker Deployment rendered"
    return found


def env_names(container: dict[str, Any]) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------------------


def test_one_worker_deployment_per_queue(manifests: list[dict[str, Any]]) -> None:
    workers = _workers(manifests)
    assert sorted(d["metadata"]["labels"]["calcinosis-cds/queue"] for d in workers) == sorted(QUEUES)
    for doc in workers:
        queue = doc["metadata"]["labels"]["calcinosis-cds/queue"]
        assert doc["metadata"]["name"] == f"{FULLNAME}-worker-{queue}"
        assert doc["spec"]["selector"]["matchLabels"]["calcinosis-cds/queue"] == queue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        args = container["args"]
        assert args[0] == "worker"
        assert args[args.index("--queues") + 1] == queue
        assert int(args[args.index("--concurrency") + 1]) >= 1
        assert "livenessProbe" not in container or container["livenessProbe"].get("httpGet") is None


def test_worker_queue_settings_are_per_queue(production: list[dict[str, Any]]) -> None:
    evaluate = one(production, "Deployment", f"{FULLNAME}-worker-evaluate")
    writeback = one(production, "Deployment", f"{FULLNAME}-worker-writeback")
    ev, wb = evaluate["spec"]["template"]["spec"]["containers"][0], writeback["spec"]["template"]["spec"]["containers"][0]
    assert ev["resources"] != wb["resources"]
    assert ev["args"][ev["args"].index("--concurrency") + 1] == "4"
    assert wb["args"][wb["args"].index("--concurrency") + 1] == "2"


def test_every_worker_pod_serves_its_metrics(manifests: list[dict[str, Any]]) -> None:
    for doc in _workers(manifests):
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        (port,) = container["ports"]
        assert port == {"name": "metrics", "containerPort": 9808, "protocol": "TCP"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CDS_WORKER_METRICS_PORT"] == "9808"
        assert env["CDS_WORKER_METRICS_HOST"] == "0.0.0.0"  # reachable from the scraper, not only inside the pod


def test_production_scrapes_every_worker_on_its_metrics_port(production: list[dict[str, Any]]) -> None:
    for doc in _workers(production):
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        (port,) = doc["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port["containerPort"])


def test_worker_metrics_can_be_turned_off_and_annotated() -> None:
    docs = render(set_json={"workers": {"metricsPort": None, "podAnnotations": {"prometheus.io/scrape": "false"}}})
    for doc in _workers(docs):
        template = doc["spec"]["template"]
        (container,) = template["spec"]["containers"]
        assert "ports" not in container
        assert not {"CDS_WORKER_METRICS_PORT", "CDS_WORKER_METRICS_HOST"} & env_names(container)
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    api = one(docs, "Deployment", f"{FULLNAME}-api")
    assert "prometheus.io/scrape" not in api["spec"]["template"]["metadata"].get("annotations", {})


def test_a_component_annotation_overrides_the_global_one_of_the_same_key() -> None:
    docs = render(
        set_json={
            "podAnnotations": {"prometheus.io/scrape": "false", "team": "renal"},
            "api": {"podAnnotations": {"prometheus.io/scrape": "true"}},
            "workers": {"podAnnotations": {"prometheus.io/scrape": "true"}},
        }
    )
    for name, component in [(f"{FULLNAME}-api", "api"), *((d["metadata"]["name"], "worker") for d in _workers(docs)), (f"{FULLNAME}-beat", "beat")]:
        annotations = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == ("false" if component == "beat" else "true"), name
        assert annotations["team"] == "renal" and annotations["checksum/config"], name


def test_default_worker_replicas_without_keda() -> None:
    docs = render(set_json={"workers": {"queues": [{"name": "evaluate", "replicas": 5, "concurrency": 3, "resources": {}}]}})
    (worker,) = [d for d in by_kind(docs, "Deployment") if "worker" in d["metadata"]["name"]]
    assert worker["metadata"]["name"] == f"{FULLNAME}-worker-evaluate"
    assert worker["spec"]["replicas"] == 5
    assert by_kind(docs, "ScaledObject") == []


def test_beat_is_a_single_replica_recreated(manifests: list[dict[str, Any]]) -> None:
    beat = one(manifests, "Deployment", f"{FULLNAME}-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert beat["spec"]["template"]["spec"]["containers"][0]["args"] == ["beat"]


def test_every_pod_is_hardened(manifests: list[dict[str, Any]]) -> None:
    specs = list(pod_specs(manifests))
    assert len(specs) >= 5  # api, 3 workers, beat, migration job
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] == 10001, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"] and "emptyDir" in volumes["data"], name
        for container in spec.get("initContainers", []) + spec["containers"]:
            sc = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc["runAsUser"] == 10001, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert "ALL" in sc["capabilities"]["drop"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] == "tmp", where
            assert mounts["/var/lib/calcinosis"] == "data", where
            assert "resources" in container and container["resources"].get("requests"), where


def test_api_probes(manifests: list[dict[str, Any]]) -> None:
    api = one(manifests, "Deployment", f"{FULLNAME}-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    port = container["ports"][0]
    assert port["name"] == container["livenessProbe"]["httpGet"]["port"] == "http"
    assert container["args"][:1] == ["serve"]
    assert container["args"][container["args"].index("--port") + 1] == str(port["containerPort"])
    service = one(manifests, "Service", f"{FULLNAME}-api")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"


def test_migration_job_is_a_pre_install_pre_upgrade_hook(manifests: list[dict[str, Any]]) -> None:
    job = one(manifests, "Job", f"{FULLNAME}-migrate")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert re.fullmatch(r"-?\d+", annotations["helm.sh/hook-weight"])
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["args"] == ["migrate"]
    # Hooks run before the ConfigMap exists: the settings are inlined, the secrets referenced.
    assert "envFrom" not in container
    assert {"CDS_DATABASE_URL", "CDS_ENVIRONMENT", "CDS_DATA_DIR"} <= env_names(container)


def test_no_secret_carries_values(manifests: list[dict[str, Any]]) -> None:
    for doc in by_kind(manifests, "Secret"):
        assert not doc.get("data") and not doc.get("stringData"), doc["metadata"]["name"]
    assert by_kind(manifests, "Secret") == []  # the chart only references existing Secrets
    secret_settings = {"CDS_DATABASE_URL", "CDS_BROKER_URL", "CDS_REDIS_URL", "CDS_SUBSCRIPTION_SECRET", "CDS_ADMIN_TOKEN"}
    for name, spec in pod_specs(manifests):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if env["name"] in secret_settings:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']}"
    (config,) = by_kind(manifests, "ConfigMap")
    assert not secret_settings & set(config["data"])


def test_configmap_uses_the_documented_names(manifests: list[dict[str, Any]]) -> None:
    documented = set(re.findall(r"^#?\s*(CDS_[A-Z0-9_]+)=", (ROOT / ".env.example").read_text(encoding="utf-8"), re.M))
    (config,) = by_kind(manifests, "ConfigMap")
    assert config["data"]["CDS_DATA_DIR"] == "/var/lib/calcinosis"
    unknown = set(config["data"]) - documented
    assert not unknown, f"ConfigMap keys not in .env.example: {sorted(unknown)}"
    for _, spec in pod_specs(manifests):
        for container in spec["containers"]:
            assert env_names(container) <= documented


#: What the Secrets the chart refers to would hold (the chart never holds them): URLs the service can use.
SECRET_VALUES = {
    "CDS_DATABASE_URL": "postgresql+psycopg://cds@db.invalid:5432/calcinosis",
    "CDS_BROKER_URL": "redis://redis.invalid:6379/0",
    "CDS_REDIS_URL": "redis://redis.invalid:6379/1",
}
MOUNTS = "/etc/calcinosis/"


def _pod_environment(config: dict[str, Any], container: dict[str, Any], files: Path) -> dict[str, str]:
    """The CDS_* variables a container starts with: the ConfigMap (envFrom), its env, a value for each Secret
    reference, and the paths of files mounted from Secrets and ConfigMaps moved under ``files``."""
    env = dict(config["data"]) if container.get("envFrom") else {}
    for entry in container.get("env", []):
        env[entry["name"]] = entry["value"] if "value" in entry else SECRET_VALUES.get(entry["name"], "a-secret")
    return {name: value.replace(MOUNTS, f"{files}{MOUNTS}") for name, value in env.items()}


def _mount_files(env: dict[str, str], pki: Pki) -> None:
    """The files the pods would find mounted: the internal CA and the issuers' JWK Sets (checked at start-up)."""
    if "CDS_TLS_CA_FILE" in env:
        Path(env["CDS_TLS_CA_FILE"]).parent.mkdir(parents=True, exist_ok=True)
        Path(env["CDS_TLS_CA_FILE"]).write_bytes(pki.ca_file.read_bytes())
    for issuer in json.loads(env.get("CDS_TRUSTED_ISSUERS", "[]")):
        if "jwks_file" in issuer:
            Path(issuer["jwks_file"]).parent.mkdir(parents=True, exist_ok=True)
            Path(issuer["jwks_file"]).write_text(json.dumps(new_ec_key().jwks()))


def test_every_pod_starts_with_the_settings_the_chart_gives_it(
    manifests: list[dict[str, Any]], tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service reads these settings before anything else and refuses to start on a bad one (production: no
    public base URL, no shared replay cache, an http JWK Set...): every pod of the default and production values."""
    (config,) = by_kind(manifests, "ConfigMap")
    specs = list(pod_specs(manifests))
    assert specs
    for name, spec in specs:
        env = _pod_environment(config, spec["containers"][0], tmp_path)
        _mount_files(env, pki)
        for variable in [n for n in os.environ if n.startswith("CDS_")]:
            monkeypatch.delenv(variable)
        for variable, value in env.items():
            monkeypatch.setenv(variable, value)
        try:
            settings = Settings()
        except ValidationError as exc:
            pytest.fail(f"{name}: {exc.errors()[0]['msg']}")
        assert settings.environment == "production", name
        assert settings.public_base_urls and settings.redis_url, name


def test_production_api_has_ingress_tls_hpa_and_pdb(production: list[dict[str, Any]]) -> None:
    api = one(production, "Deployment", f"{FULLNAME}-api")
    assert "replicas" not in api["spec"]  # the HPA owns the replica count
    hpa = one(production, "HorizontalPodAutoscaler", f"{FULLNAME}-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-api"}
    pdb = one(production, "PodDisruptionBudget", f"{FULLNAME}-api")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    ingress = one(production, "Ingress", f"{FULLNAME}-api")
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    assert {r["host"] for r in ingress["spec"]["rules"]} <= tls_hosts
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == f"{FULLNAME}-api"


def test_default_values_have_no_ingress_or_hpa() -> None:
    docs = render()
    assert by_kind(docs, "Ingress") == [] and by_kind(docs, "HorizontalPodAutoscaler") == []
    assert one(docs, "Deployment", f"{FULLNAME}-api")["spec"]["replicas"] == 2


def test_production_keda_scales_each_queue_on_its_redis_list(production: list[dict[str, Any]]) -> None:
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in by_kind(production, "ScaledObject")}
    assert set(scaled) == {f"{FULLNAME}-worker-{q}" for q in QUEUES}
    auth = one(production, "TriggerAuthentication", f"{FULLNAME}-keda-redis")
    assert auth["spec"]["secretTargetRef"][0]["parameter"] == "password"
    for queue in QUEUES:
        obj = scaled[f"{FULLNAME}-worker-{queue}"]
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == queue
        assert int(trigger["metadata"]["listLength"]) > 0
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
        # KEDA owns the replica count of the worker Deployment.
        assert "replicas" not in one(production, "Deployment", f"{FULLNAME}-worker-{queue}")["spec"]


def test_production_secret_files_are_mounted_read_only(production: list[dict[str, Any]]) -> None:
    api = one(production, "Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in api["volumes"]}
    assert volumes["smart-key"]["secret"]["secretName"] == "calcinosis-cds-smart"
    assert volumes["jwks"]["secret"]["secretName"] == "calcinosis-cds-jwks"
    mounts = {m["name"]: m for m in api["containers"][0]["volumeMounts"]}
    assert mounts["smart-key"]["readOnly"] is True and mounts["jwks"]["readOnly"] is True
    env = {e["name"]: e for e in api["containers"][0]["env"]}
    assert env["CDS_SMART_PRIVATE_KEY_FILE"]["value"] == "/etc/calcinosis/smart/smart-private-key.pem"
    assert env["CDS_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "calcinosis-cds-runtime", "key": "admin-token"}


def test_the_internal_ca_is_mounted_from_a_configmap_in_every_pod(production: list[dict[str, Any]]) -> None:
    specs = list(pod_specs(production))
    assert specs
    for name, spec in specs:
        env = {e["name"]: e for e in spec["containers"][0].get("env", [])}
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert env["CDS_TLS_CA_FILE"]["value"] == "/etc/calcinosis/ca/ca.pem", name
        assert volumes["trusted-ca"]["configMap"]["name"] == "hospital-ca-bundle", name
        assert mounts["trusted-ca"] == {"name": "trusted-ca", "mountPath": "/etc/calcinosis/ca", "readOnly": True}, name


def test_default_values_trust_the_public_cas_only() -> None:
    specs = list(pod_specs(render()))
    assert specs
    for name, spec in specs:
        assert "CDS_TLS_CA_FILE" not in env_names(spec["containers"][0]), name
        assert "trusted-ca" not in {v["name"] for v in spec["volumes"]}, name


def test_the_fallback_proxy_comes_from_a_secret() -> None:
    specs = list(pod_specs(render(set_json={"secrets": {"existingSecret": "cds", "hookFetchProxy": {"enabled": True}}})))
    assert specs
    for name, spec in specs:
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["CDS_HOOK_FETCH_PROXY"]["valueFrom"]["secretKeyRef"] == {"name": "cds", "key": "hook-fetch-proxy"}, name


def test_an_enabled_internal_ca_needs_its_configmap() -> None:
    assert "configMap" in render_fails({"trustedCa": {"enabled": True, "configMap": ""}})


@pytest.mark.parametrize(
    "bad",
    [
        {"image": {"pullPolicy": "Sometimes"}},
        {"env": {"CDS_DATABASE_URL": "postgresql://u:p@db/x"}},  # secrets never go to the ConfigMap
        {"env": {"CDS_HOOK_FETCH_PROXY": "http://user:pw@proxy:3128"}},
        {"env": {"CDS_TLS_CA_FILE": "/etc/ca.pem"}},  # set by trustedCa, from its mounted file
        {"env": {"CDS_WORKER_METRICS_PORT": 9100}},  # set per worker pod by workers.metricsPort
        {"workers": {"metricsPort": 80}},  # the pods run as non-root: no privileged port
        {"env": {"CDS_LOG_LEVEL": "CRITICAL"}},  # the service accepts DEBUG, INFO, WARNING and ERROR only
        {"env": {"CDS_ENVIRONMENT": "production", "CDS_DEV_MODE": "true"}},
        {"env": {"CDS_PUBLIC_BASE_URLS": None}},  # production: the JWT aud would come from the client's Host header
        {"env": {"CDS_PUBLIC_BASE_URLS": "[]"}},
        {"secrets": {"redisUrl": {"enabled": False}}},  # production: the replay cache is shared by every pod and process
        {"env": {"log_level": "INFO"}},
        {"workers": {"queues": [{"name": "notifications", "replicas": 1, "concurrency": 1, "resources": {}}]}},
        {"securityContext": {"readOnlyRootFilesystem": False}},
        {"podSecurityContext": {"runAsNonRoot": False}},
        {"keda": {"enabled": True, "redis": {"address": ""}}},
        {"unknownTopLevelKey": 1},
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    stderr = render_fails(bad)
    assert "schema" in stderr or "values" in stderr
