"""deploy/ is lint-clean, valid against its schemas, and consistent with streamd.

No Docker daemon or cluster is needed: hadolint lints the Dockerfile, the wheel stage is
rebuilt from exactly the files it copies, check-jsonschema checks compose.yaml against
the compose spec (vendored in check-jsonschema), promtool checks the Prometheus config,
and the kustomize render is validated offline by kubernetes-validate.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from streamd.cli.main import build_parser
from streamd.config import BrokerConfig

from ..conftest import ROOT
from .files import DEPLOY, by_kind, concat_resources, dockerfile, port_of, render_kustomization

GRPC_PORT = port_of(BrokerConfig().listen)
DATA_DIR = "/var/lib/streamd"
#: Oldest Kubernetes the manifests support (native gRPC probes are GA since 1.27), and the newest known.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def tool(name: str) -> str:
    """A dev dependency's executable, installed beside this interpreter."""
    path = Path(sysconfig.get_path("scripts")) / name
    assert path.exists(), f"{name} missing: pip install -e '.[dev]'"
    return str(path)


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def instruction(keyword: str, *, stage: int = -1) -> list:
    """The instructions named ``keyword`` in the last (runtime) stage by default."""
    instructions = dockerfile()
    last = instructions[-1].stage if stage == -1 else stage
    return [i for i in instructions if i.keyword == keyword and i.stage == last]


def image_args() -> list[str]:
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    return entrypoint.exec_form() + cmd.exec_form()


def healthcheck_argv() -> list[str]:
    (check,) = instruction("HEALTHCHECK")
    shell, flag, script = check.exec_form()
    assert (shell, flag) == ("sh", "-c")
    return shlex.split(script.split("||")[0])


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- Dockerfile ----------------------------------------------------------------------
def test_dockerfile_is_hadolint_clean():
    hadolint = tool("hadolint")
    result = run(hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", "deploy/Dockerfile",
                 cwd=ROOT)
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr
    # Guard against a vacuous pass: the same invocation does fail on a bad Dockerfile.
    bad = run(hadolint, "--no-color", "--failure-threshold", "style", "-", input="FROM python:latest\n")
    assert bad.returncode != 0 and "DL3007" in bad.stdout


def test_dockerfile_build_stage_copies_all_the_wheel_needs(tmp_path):
    """Rebuild the build stage's wheel from exactly the files its COPY lines name."""
    src = tmp_path / "src"
    src.mkdir()
    copies = instruction("COPY", stage=0)
    assert copies
    for copy in copies:
        *sources, dest = copy.text.split()
        for source in sources:
            target = src / dest / source if dest.endswith("/") else src / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, target)
    result = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                 str(tmp_path / "wheels"), str(src))
    assert result.returncode == 0, result.stdout + result.stderr

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (wheel,) = (tmp_path / "wheels").glob("streamd-*.whl")
    assert wheel.name.startswith(f"streamd-{version}-")
    # The runtime stage installs streamd==STREAMD_VERSION from these wheels.
    assert f"STREAMD_VERSION={version}" in [i.text for i in instruction("ARG")]
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("streamd/v1/streamd_pb2.py", "streamd/cli/main.py", "segments/__init__.py",
                   "consumer_groups/__init__.py"):
        assert module in names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "streamd = streamd.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_image_runs_as_non_root_with_a_data_volume():
    stages = {i.stage for i in dockerfile()}
    assert len(stages) >= 2, "multi-stage: build the wheel, then install it"
    (user,) = instruction("USER")
    assert user.text.split(":")[0] not in ("0", "root")
    (volume,) = instruction("VOLUME")
    assert json.loads(volume.text) == [DATA_DIR]
    args = image_args()
    assert args[:2] == ["streamd", "serve"]
    assert option(args, "--data-dir") == DATA_DIR


def test_image_grpc_port_and_healthcheck_match_streamd_default():
    (expose,) = instruction("EXPOSE")
    assert GRPC_PORT in {int(p) for p in expose.text.split()}
    assert port_of(option(image_args(), "--listen")) == GRPC_PORT
    argv = healthcheck_argv()
    assert argv[:2] == ["streamd", "health"]
    assert option(argv, "--server") == f"127.0.0.1:{GRPC_PORT}"


def test_image_and_statefulset_commands_are_accepted_by_the_cli(capsys):
    """`streamd serve ...` (image CMD, StatefulSet args) and the HEALTHCHECK parse."""
    container = by_kind(concat_resources())["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    for argv in (image_args(), healthcheck_argv(), ["streamd", *container["args"]]):
        assert argv[0] == "streamd"
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"streamd refuses {shlex.join(argv)}: {capsys.readouterr().err}")


def test_metrics_port_matches_streamd_default_everywhere():
    """Image, compose, the Prometheus scrape target and the StatefulSet use streamd's port."""
    port = port_of(BrokerConfig().metrics_listen)
    (expose,) = instruction("EXPOSE")
    assert port in {int(p) for p in expose.text.split()}
    assert port_of(option(image_args(), "--metrics-listen")) == port
    assert f"127.0.0.1:{port}:{port}" in compose()["services"]["streamd"]["ports"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "streamd"]
    assert job["static_configs"][0]["targets"] == [f"streamd:{port}"]
    _, pod, container = statefulset_container()
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == port
    assert port_of(option(container["args"], "--metrics-listen")) == port
    assert pod_annotations()["prometheus.io/port"] == str(port)


# -- Compose and Prometheus -------------------------------------------------------------
def check_compose(path: Path) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path))


def test_compose_file_matches_the_compose_spec(tmp_path):
    result = check_compose(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = compose()
    broken["services"]["streamd"]["portz"] = ["50051:50051"]
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "compose.yaml").returncode != 0, "the schema check must catch a typo"


def test_compose_runs_the_image_on_its_ports_and_volume():
    services = compose()["services"]
    assert set(services) == {"streamd", "prometheus", "grafana"}
    streamd = services["streamd"]
    build = streamd["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    published = {int(p.rsplit(":", 1)[1]) for p in streamd["ports"]}
    (expose,) = instruction("EXPOSE")
    assert published == {int(p) for p in expose.text.split()}
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", [])), \
        "the Compose setup runs without an auth_file: publish on the host's loopback only"
    assert [v.split(":")[1] for v in streamd["volumes"]] == [DATA_DIR]


def bind_mounts(service: dict) -> dict[str, Path]:
    """{container path: host path} for the relative bind mounts of a compose service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_compose_bind_mounts_exist():
    for name, service in compose()["services"].items():
        for target, source in bind_mounts(service).items():
            if source == DEPLOY / "grafana" / "streamd.json":
                continue  # the metrics work's file: test_grafana_dashboard_uses_the_provisioned_datasource
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"


@pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"),
                    reason="promtool is not installed (Debian package prometheus; .ci/run installs it)")
def test_prometheus_config_is_valid_and_scrapes_the_broker():
    config = DEPLOY / "prometheus" / "prometheus.yml"
    result = run("promtool", "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    prometheus = compose()["services"]["prometheus"]
    assert bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"] == config


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_mount():
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "streamd.yaml").read_text())["providers"]
    dashboard_target = next(t for t, s in mounts.items() if s == DEPLOY / "grafana" / "streamd.json")
    assert str(PurePosixPath(dashboard_target).parent) == provider["options"]["path"]


def datasource_refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def test_grafana_dashboard_uses_the_provisioned_datasource():
    """File provisioning does not resolve an exported dashboard's ``__inputs``: its
    panels must name the provisioned datasource (uid ``prometheus``) or a variable."""
    dashboard = json.loads((DEPLOY / "grafana" / "streamd.json").read_text())
    assert "__inputs" not in dashboard
    (source,) = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    for ref in datasource_refs(dashboard):
        uid = ref.get("uid") if isinstance(ref, dict) else ref
        if isinstance(ref, dict) and ref.get("type") not in (None, "prometheus"):
            continue  # Grafana's own annotations datasource
        assert uid is None or uid in (source["uid"], source["name"]) or uid.startswith("$"), ref


# -- Kubernetes ----------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kustomize_render_is_valid_kubernetes(version):
    docs = render_kustomization()
    assert sorted(by_kind(docs)) == ["ConfigMap", "Secret", "Service", "StatefulSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: nothing to compare with")
def test_python_render_matches_kubectl_kustomize():
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(concat_resources(), key=key) == sorted(render_kustomization(), key=key)


def pod_annotations() -> dict:
    return by_kind(render_kustomization())["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]


def statefulset_container() -> tuple[dict, dict, dict]:
    resources = by_kind(render_kustomization())
    statefulset = resources["StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return resources, pod, container


def test_statefulset_has_a_volume_per_pod_and_a_headless_service():
    resources, pod, container = statefulset_container()
    statefulset, service = resources["StatefulSet"], resources["Service"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == DATA_DIR
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert ports["grpc"] == GRPC_PORT


def test_statefulset_probes_ask_grpc_health_on_the_broker_port():
    _, _, container = statefulset_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe


def test_statefulset_is_locked_down_and_sized():
    _, pod, container = statefulset_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    (user,) = instruction("USER")
    assert str(pod["securityContext"]["runAsUser"]) == user.text.split(":")[0], "the image's user"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_configmap_toml_is_a_streamd_config_for_the_pod(tmp_path):
    resources, pod, container = statefulset_container()
    config_path = PurePosixPath(option(container["args"], "--config"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_volume = volumes[mounts[str(config_path.parent)]]
    configmap = resources["ConfigMap"]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]

    (tmp_path / config_path.name).write_text(configmap["data"][config_path.name])
    config = BrokerConfig.load(file=tmp_path / config_path.name, env={})
    assert port_of(config.listen) == GRPC_PORT
    assert str(config.data_dir) == DATA_DIR
    assert config.shutdown_grace_s < pod["terminationGracePeriodSeconds"]

    secret_volume = next(v for v in volumes.values() if "secret" in v)
    assert secret_volume["secret"]["secretName"] == resources["Secret"]["metadata"]["name"]
    assert secret_volume["name"] in mounts.values()
