"""Issue 13 §1: the KubeRay manifest in cluster/kuberay/ (a ray.io/v1 RayCluster and what it
needs: the config, the coordinator's volume, the OpenAI Service).

The KubeRay CRD cannot be fetched here, so the RayCluster is checked structurally: every
field is one KubeRay's Go types define (ray-operator/apis/ray/v1/raycluster_types.go: the
json names below), with the types and the rules its validation applies
(ray-operator/controllers/ray/utils/validation.go: containers present, min/max replicas set
without the autoscaler, min <= replicas <= max), and what KubeRay does with it
(controllers/ray/common: the Ray container is containers[0]; with
`ray.io/overwrite-container-cmd` it runs our command, which must start
$KUBERAY_GEN_RAY_START_CMD; the head Service carries the head container's ports and selects
`ray.io/cluster` + `ray.io/node-type`). Every meshd command line parses with meshd's CLI
parser and, with the ConfigMap's meshd.toml and the pod's environment, loads as its config.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from support.shell import commands

from meshd import cli, config

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "kuberay" / "meshd-raycluster.yaml"
# RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AuthOptions: their json field names
SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
        "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
        "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
        "workerGroupSpecs"}
HEAD = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
        "rayStartParams", "serviceType"}
WORKER = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas",
          "idleTimeoutSeconds", "priority", "resources", "labels", "rayStartParams", "template",
          "scaleStrategy", "numOfHosts"}
AUTH = {"enableK8sTokenAuth", "secretName", "mode"}
# the core/v1 fields this manifest uses, of the types KubeRay embeds (PodTemplateSpec)
POD = {"securityContext", "initContainers", "containers", "volumes",
       "terminationGracePeriodSeconds"}
CONTAINER = {"name", "image", "command", "args", "env", "ports", "resources", "volumeMounts"}
RESOURCES = {"requests", "limits"}
VOLUME_SOURCES = {"configMap", "secret", "emptyDir", "persistentVolumeClaim"}
OVERWRITE = "ray.io/overwrite-container-cmd"
INSTALLED_CONFIG = "/etc/meshd/meshd.toml"


def documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs) == 4
    return kinds


def cluster() -> dict[str, Any]:
    rc = documents()["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    return rc


def groups(rc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = rc["spec"]
    return [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]]


def mesh_toml(tmp_path: Path) -> Path:
    path = tmp_path / "meshd.toml"
    path.write_text(documents()["ConfigMap"]["data"]["meshd.toml"])
    return path


def pod_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's MESHD_* variables as a pod would see them (values from the API or a
    Secret get a placeholder of their kind)."""
    out = {}
    for e in container.get("env", []):
        assert e["name"] and (("value" in e) != ("valueFrom" in e)), e
        if not e["name"].startswith("MESHD_"):
            continue
        source = e.get("valueFrom", {})
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP"
            out[e["name"]] = "10.244.1.7"
        elif "secretKeyRef" in source:
            out[e["name"]] = {"MESHD_AGENT_JOIN_TOKEN": "mjt_0123456789ab.secret",
                              "MESHD_GATEWAY_API_KEYS": "acme=sk-acme-012345"}[e["name"]]
        else:
            out[e["name"]] = e["value"]
    return out


def test_the_raycluster_has_only_fields_kuberay_defines() -> None:
    rc = cluster()
    spec = rc["spec"]
    assert set(spec) <= SPEC, set(spec) - SPEC
    assert spec["rayVersion"] == ray.__version__  # the Ray meshd is tested with
    assert set(spec["authOptions"]) <= AUTH and spec["authOptions"]["mode"] == "token"
    assert not spec.get("enableInTreeAutoscaling")  # meshd scales by replicas, not Ray demand
    assert set(spec["headGroupSpec"]) <= HEAD
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)) and names
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= WORKER, set(g) - WORKER
        # validation.go: without the autoscaler both bounds are required
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for name, g in groups(rc):
        params = g["rayStartParams"]  # map[string]string
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), name
        assert params["num-gpus"] == "0", name  # the GPUs are meshd's, not Ray's
        pod = g["template"]["spec"]
        assert set(pod) <= POD, (name, set(pod) - POD)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert len(volumes) == len(pod.get("volumes", []))
        for v in volumes.values():
            assert len(set(v) & VOLUME_SOURCES) == 1 and set(v) <= VOLUME_SOURCES | {"name"}
        conts = pod.get("initContainers", []) + pod["containers"]
        assert pod["containers"] and len({c["name"] for c in conts}) == len(conts), name
        for c in conts:
            assert set(c) <= CONTAINER and c["name"] and c["image"], (name, c.get("name"))
            assert set(c.get("resources", {})) <= RESOURCES
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes and m["mountPath"].startswith("/"), (name, m)
            for p in c.get("ports", []):
                assert len(p["name"]) <= 15 and 0 < p["containerPort"] < 65536


def test_kuberay_runs_our_commands_and_starts_ray_itself() -> None:
    """With the overwrite annotation, the Ray container (containers[0]) runs its own command,
    which must run the `ray start` KubeRay generated (it adds --block, the head address)."""
    rc = cluster()
    assert rc["metadata"]["annotations"][OVERWRITE] == "true"
    for name, g in groups(rc):
        ray_container = g["template"]["spec"]["containers"][0]
        assert ray_container["command"] == ["/bin/bash", "-c", "--"], name
        (script,) = ray_container["args"]
        assert "$KUBERAY_GEN_RAY_START_CMD" in script, name
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
        assert "nvidia.com/gpu" not in str(ray_container["resources"]), name


def test_workers_join_ray_after_the_coordinator_is_placed(tmp_path: Path) -> None:
    """Ray places actors that ask for no resources (meshd's) on a random node: a worker pod's
    Ray node joins only once the head's gateway (deployed last) answers."""
    rc = cluster()
    mesh = config.load(mesh_toml(tmp_path), environ={})
    wait = f"until (exec 3<>/dev/tcp/{rc['metadata']['name']}-head-svc/{mesh.gateway.port})"
    for name, g in groups(rc)[1:]:
        (script,) = g["template"]["spec"]["containers"][0]["args"]
        assert -1 < script.find(wait) < script.find("$KUBERAY_GEN_RAY_START_CMD"), name


def meshd_commands(rc: dict[str, Any]) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(group, container, argv) for every meshd command in the containers."""
    out = []
    for name, g in groups(rc):
        spec = g["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            argv = [*c.get("command", []), *c.get("args", [])]
            if Path(argv[0]).name == "meshd":
                out.append((name, c, argv[1:]))
            elif argv[:2] in (["/bin/bash", "-c"], ["/bin/sh", "-c"]):
                out += [(name, c, a) for a in commands(argv[-1], "meshd")]
    return out


def test_every_meshd_command_parses_and_loads_its_config(tmp_path: Path) -> None:
    rc = cluster()
    toml = mesh_toml(tmp_path)
    found = meshd_commands(rc)
    assert {(name, tuple(a[2:4])) for name, _, a in found} == {
        ("head", ("coordinator", "stop")), ("head", ("coordinator", "start")),
        ("gpu", ("agent",)), ("gpu-pinned", ("agent", "--attr"))}
    for name, container, argv in found:
        args = cli._parser().parse_args(argv)  # SystemExit on anything meshd would refuse
        assert args.config == INSTALLED_CONFIG
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/etc/meshd"] == "config"
        mesh = config.load(toml, cli.overrides(args), environ=pod_env(container))
        if args.command == "coordinator":
            assert args.ray_address == "$MY_POD_IP:6379"  # not 127.0.0.1: see docs/deploy.md
            assert mesh.gateway.api_keys == {"acme": "sk-acme-012345"}
            assert mounts[str(Path(mesh.coordinator.state_dir).parent)] == "state"
            continue
        assert mesh.agent.host == "10.244.1.7" and mounts[
            str(Path(mesh.agent.state_dir).parent)] == "agent-state"
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == container["resources"]["requests"]["nvidia.com/gpu"]
        assert gpus == mesh.vllm.count * mesh.vllm.tensor_parallel_size, name
        assert mounts[str(Path(mesh.vllm.kv_secret_file).parent)] == "kv-secret"
        if name == "gpu":  # identical pods: each enrolls its own key with the group's token
            assert mesh.agent.join_token.startswith("mjt_")
        else:  # the pinned node: its key from a Secret, trusted (and pinned) beforehand
            assert not mesh.agent.join_token and mesh.agent.attributes == {
                "privacy": "restricted"}


def test_keys_come_from_secrets_through_a_private_copy() -> None:
    """meshd refuses a key file others can read (node_agent/identity.py), and a Secret volume
    is group-readable under fsGroup: an init container copies each key 0600 into a 0700 dir,
    and the group's per-pod state (its own key) lives in memory."""
    rc = cluster()
    by_name = dict(groups(rc))
    pinned = by_name["gpu-pinned"]["template"]["spec"]
    (init,) = pinned["initContainers"]
    assert "install -m 0600 /keys/node.key /var/lib/meshd/agent/node.key" in init["args"][0]
    assert "install -d -m 0700 /var/lib/meshd/agent" in init["args"][0]
    volumes = {v["name"]: v for v in pinned["volumes"]}
    assert volumes["node-key"]["secret"]["secretName"] == "meshd-node-pinned-0"
    gpu = {v["name"]: v for v in by_name["gpu"]["template"]["spec"]["volumes"]}
    assert gpu["agent-state"]["emptyDir"]["medium"] == "Memory"
    head = by_name["head"]["template"]["spec"]
    assert head["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert "install -m 0600 /keys/receipt.key" in head["initContainers"][0]["args"][0]


def test_services_and_the_control_plane_address(tmp_path: Path) -> None:
    docs = documents()
    rc = docs["RayCluster"]
    mesh = config.load(mesh_toml(tmp_path), environ={})
    head_ports = {p["name"]: p["containerPort"] for p in
                  rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    # the agents dial KubeRay's head Service, which carries the head container's ports
    host, _, port = mesh.agent.coordinator.rpartition(":")
    assert host == f"{rc['metadata']['name']}-head-svc"
    assert int(port) == mesh.coordinator.grpc_port == head_ports["meshd-control"]
    svc = docs["Service"]
    assert svc["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"],
                                       "ray.io/node-type": "head"}
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["openai"]["port"] == mesh.gateway.port == head_ports["openai"]
    assert ports["meshd-metrics"]["port"] == mesh.coordinator.metrics_port == head_ports[
        "meshd-metrics"]
    for p in ports.values():
        assert p["targetPort"] in head_ports
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    head_volumes = rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "state", "persistentVolumeClaim": {"claimName": claim}} in head_volumes


def test_every_secret_it_reads_is_documented() -> None:
    text = MANIFEST.read_text()
    secrets = set(re.findall(r"secretName: ([a-z0-9-]+)", text)) | set(
        re.findall(r"secretKeyRef: \{name: ([a-z0-9-]+)", text))
    assert secrets == {"meshd-enroll", "meshd-kv-secret", "meshd-gateway-keys",
                       "meshd-head-keys", "meshd-node-pinned-0"}
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for name in secrets:
        assert f"kubectl create secret generic {name}" in deploy, name


@pytest.mark.parametrize("doc", ["ConfigMap", "PersistentVolumeClaim", "Service"])
def test_the_other_documents_are_plain_core_v1(doc: str) -> None:
    d = documents()[doc]
    assert d["apiVersion"] == "v1" and d["metadata"]["name"]
    assert d["metadata"]["labels"] == {"app.kubernetes.io/name": "meshd"}
