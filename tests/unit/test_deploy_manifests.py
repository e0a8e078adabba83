"""manifests/: every object valid against the Kubernetes OpenAPI schema (kubernetes-validate,
offline with its bundled schemas), and the properties that matter checked one by one: RBAC
read-only on exactly three resources, the DaemonSet's config parses, its command exists."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent import capabilities, config
from agent.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
RESOURCE_FILES = ("rbac.yaml", "configmap.yaml", "daemonset.yaml", "test-app.yaml")
# kind's node images of the last releases, and the newest schema the package has
KUBERNETES_VERSIONS = ("1.31.0", "1.33.0", kubernetes_validate.latest_version())


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def objects() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for name in RESOURCE_FILES
            for d in documents(name)}


def daemonset() -> dict:
    return objects()["DaemonSet", "bpfproxy"]


def container() -> dict:
    (only,) = daemonset()["spec"]["template"]["spec"]["containers"]
    return only


def agent_config() -> dict:
    configmap = objects()["ConfigMap", "bpfproxy"]
    return yaml.safe_load(configmap["data"]["config.yaml"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", RESOURCE_FILES)
def test_every_object_is_valid_against_the_openapi_schema(name, version):
    found = documents(name)
    assert found
    for document in found:
        # strict: an unknown or misspelt field fails, as `kubectl apply --validate=strict`
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_does_catch_a_mistake():
    broken = daemonset()
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_rbac_reads_exactly_services_endpointslices_and_nodes():
    role = objects()["ClusterRole", "bpfproxy"]
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert granted == {("", "services"): {"get", "list", "watch"},
                       ("", "nodes"): {"get", "list", "watch"},
                       ("discovery.k8s.io", "endpointslices"): {"get", "list", "watch"}}
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])


def test_the_binding_gives_that_role_to_the_daemonsets_service_account():
    binding = objects()["ClusterRoleBinding", "bpfproxy"]
    account = objects()["ServiceAccount", "bpfproxy"]
    pod = daemonset()["spec"]["template"]["spec"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "bpfproxy"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bpfproxy",
                                    "namespace": "kube-system"}]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["namespace"] == daemonset()["metadata"]["namespace"] \
        == "kube-system"


def test_the_daemonset_runs_on_every_node_and_never_leaves_one_without_a_proxy():
    spec = daemonset()["spec"]
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {
        "maxUnavailable": 1, "maxSurge": 0}}
    # privileged only the init container that mounts bpffs; the agent: capabilities
    assert container()["securityContext"] == {
        "privileged": False, "appArmorProfile": {"type": "Unconfined"},
        "seccompProfile": {"type": "RuntimeDefault"},
        "capabilities": {"drop": ["ALL"],
                         "add": sorted(capabilities.name(c).removeprefix("CAP_")
                                       for c in capabilities.CONTAINER_CAPABILITIES)}}
    (mount_bpffs,) = pod["initContainers"]
    assert mount_bpffs["securityContext"] == {"privileged": True}
    assert mount_bpffs["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf",
                                            "mountPropagation": "Bidirectional"}]
    assert pod["dnsPolicy"] == "Default"     # cluster DNS is a Service we have to serve first


def test_probes_ask_the_health_endpoint_the_config_opens():
    port = int(agent_config()["healthz"].rsplit(":", 1)[1])
    probes = {name: container()[name]["httpGet"]
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"] == {"path": "/livez", "port": port}
    assert probes["startupProbe"] == {"path": "/livez", "port": port}
    assert probes["readinessProbe"] == {"path": "/healthz", "port": port}
    assert port == 10256                      # kube-proxy's healthz port, as the issue says


def test_mounts_give_the_agent_what_its_config_names():
    pod = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    settings = agent_config()

    def host_path(mount_path: str) -> str:
        return volumes[mounts[mount_path]["name"]]["hostPath"]["path"]

    assert host_path("/sys/fs/bpf") == "/sys/fs/bpf"
    # the init container mounted bpffs there (Bidirectional); the agent sees it
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert Path(settings["bpffs"]).is_relative_to("/sys/fs/bpf")
    assert host_path(settings["cgroup"]) == "/sys/fs/cgroup"
    api_socket = Path(settings["api"].removeprefix("unix://"))
    assert host_path(str(api_socket.parent)) == "/run/bpfproxy"
    assert host_path("/host/lib/modules") == "/lib/modules"
    assert host_path("/usr/src") == "/usr/src"
    assert mounts["/host/lib/modules"]["readOnly"] and mounts["/usr/src"]["readOnly"]
    # the config file the args name is the ConfigMap's key, mounted there
    args = container()["args"]
    config_file = Path(args[args.index("--config") + 1])
    assert volumes[mounts[str(config_file.parent)]["name"]]["configMap"] == {
        "name": "bpfproxy", "items": [{"key": "config.yaml", "path": config_file.name}]}


def test_the_configmaps_config_is_valid_and_in_cluster():
    values = config.parse(agent_config())
    assert "kubeconfig" not in values and "manifests" not in values   # in-cluster source
    assert "node_name" not in values      # per node: --node-name $(NODE_NAME)


def test_the_api_servers_address_reaches_the_agent_from_the_configmap():
    env = {e["name"]: e for e in container()["env"]}
    data = objects()["ConfigMap", "bpfproxy"]["data"]
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "bpfproxy" and ref["key"] in data
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (MANIFESTS / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_images_command_is_our_cli():
    """ENTRYPOINT is the script that execs `bpfproxy`, a console script of this package;
    the DaemonSet's args and the image's CMD are commands that CLI accepts."""
    steps = dockerfile_instructions()
    entrypoint = yaml.safe_load(dict(steps)["ENTRYPOINT"])
    copies = {dest: src for kind, line in steps if kind == "COPY"
              for *sources, dest in [line.split()] for src in sources}
    script = REPO / copies[entrypoint[0]]
    assert script.exists() and os.access(script, os.X_OK)
    assert script.read_text().rstrip().endswith('exec bpfproxy "$@"')
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bpfproxy"] == "agent.cli:main"
    args = [a.replace("$(NODE_NAME)", "node-a") for a in container()["args"]]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "agent" and parsed.node_name == "node-a"
    assert build_parser().parse_args(yaml.safe_load(dict(steps)["CMD"])).command == "agent"


def test_the_image_is_debian_with_bcc_and_headers_and_copies_what_exists():
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "debian:bookworm-slim")
    run = " ".join(line for kind, line in steps if kind == "RUN")
    for package in ("python3-bpfcc", "linux-headers-amd64"):
        assert re.search(rf"\b{package}\b", run)
    for kind, line in steps:
        if kind == "COPY":
            for source in line.split()[:-1]:
                assert (REPO / source).exists(), source


@pytest.mark.parametrize("script,shell", [("manifests/entrypoint.sh", "sh"),
                                          ("scripts/kind.sh", "bash")])
def test_scripts_parse(script, shell):
    done = subprocess.run([shell, "-n", str(REPO / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_kind_cluster_has_no_kube_proxy():
    (cluster,) = documents("kind-config.yaml")
    assert (cluster["kind"], cluster["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert cluster["networking"]["kubeProxyMode"] == "none"
    assert "disableDefaultCNI" not in cluster["networking"]   # kindnet routes the pods
    roles = [node["role"] for node in cluster["nodes"]]
    assert roles.count("control-plane") == 1 and roles.count("worker") >= 1


def test_the_test_app_has_a_cluster_ip_and_a_node_port_service():
    services = {d["spec"]["type"]: d for d in documents("test-app.yaml")
                if d["kind"] == "Service"}
    assert set(services) == {"ClusterIP", "NodePort"}
    assert services["NodePort"]["spec"]["ports"][0]["nodePort"] == 30080


def test_kind_targets_fail_early_and_clearly_without_docker(tmp_path):
    """`make kind-up` with no docker on PATH: one clear line, a failure, nothing else run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "make", "dirname", "kind"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if not (bin_dir / "make").exists():
        pytest.skip("make is not installed")
    for target in ("kind-up", "kind-deploy", "kind-test", "kind-down"):
        done = subprocess.run(["make", "-s", target], cwd=REPO, capture_output=True, text=True,
                              env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60)
        assert done.returncode != 0, target
        assert "kind: docker is not installed (or not on PATH)" in done.stderr, done.stderr


def test_make_has_the_kind_targets_wired_to_the_script():
    makefile = (REPO / "Makefile").read_text()
    for step in ("up", "deploy", "test", "down"):
        recipe = re.search(rf"^kind-{step}:.*\n\t(.+)$", makefile, re.MULTILINE)
        assert recipe and shlex.split(recipe.group(1)) == ["bash", "scripts/kind.sh", step]


# ---- least privilege (issue 13, A5) -------------------------------------------------------

# what the agent writes: pins on bpffs, its API socket; every other mount is read only
WRITTEN_MOUNTS = {"/sys/fs/bpf", "/run/bpfproxy"}


def test_the_agent_runs_under_the_runtimes_seccomp_filter():
    context = container()["securityContext"]
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_what_the_agent_only_reads_is_mounted_read_only():
    mounts = container()["volumeMounts"]
    writable = {m["mountPath"] for m in mounts if not m.get("readOnly")}
    assert writable == WRITTEN_MOUNTS
    assert {m["mountPath"] for m in mounts} > WRITTEN_MOUNTS | {"/host/sys/fs/cgroup"}


def test_host_namespaces_are_the_two_the_agent_needs_each_with_its_reason():
    pod = daemonset()["spec"]["template"]["spec"]
    shared = {key for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)}
    assert shared == {"hostNetwork", "hostPID"}
    text = (MANIFESTS / "daemonset.yaml").read_text()
    # hostPID only for the stale-UDP sweep through /proc/<pid>/ns/net, said where it is set
    reason = text[:text.index("hostPID: true")].rsplit("hostNetwork", 1)[1]
    assert "/proc/<pid>/ns/net" in reason and "pid namespace" in reason


def test_the_container_gets_only_what_the_agent_and_its_opener_keep():
    added = set(container()["securityContext"]["capabilities"]["add"])
    kept = {capabilities.name(c).removeprefix("CAP_")
            for c in capabilities.AGENT_CAPABILITIES | capabilities.NETNS_OPENER_CAPABILITIES}
    assert added == kept | {"SETPCAP"}
    # the process that parses input and serves the API cannot enter namespaces or trace
    assert not capabilities.AGENT_CAPABILITIES & {capabilities.CAP_SYS_ADMIN,
                                                  capabilities.CAP_SYS_PTRACE}
