"""The deployment files, checked offline with the real parsers: Docker Compose (the version
Synology ships and a current one), kustomize + Kubernetes schemas, and the Dockerfile."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pacsflow.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_VERSIONS = ("2.20.3", "2.40.3")
KUBERNETES_VERSION = "1.31.0"
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def compose_binary(version: str) -> Path:
    binary = ROOT / ".tools" / f"compose-{version}" / "compose" / "docker-compose"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run `make tools` (make test does)")
    return binary


def compose(version: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(compose_binary(version)), "--project-directory", str(ROOT),
         "--env-file", str(ROOT / ".env.example"), "-f", str(ROOT / "compose.yaml"), *args],
        capture_output=True, text=True, timeout=60,
    )


def cli_accepts(args: list[str]) -> bool:
    """Whether ``pacsflow ARGS`` parses (the command exists with those arguments)."""
    try:
        build_parser().parse_args(args)
    except SystemExit:
        return False
    return True


class TestCompose:
    @pytest.mark.parametrize("version", COMPOSE_VERSIONS)
    @pytest.mark.parametrize("profile", [[], ["--profile", "monitoring"]])
    def test_the_compose_parser_accepts_it(self, version: str, profile: list[str]) -> None:
        result = compose(version, *profile, "config", "-q")
        assert result.returncode == 0, result.stderr

    @pytest.mark.parametrize("version", COMPOSE_VERSIONS)
    def test_every_service_and_its_command(self, version: str) -> None:
        result = compose(version, "--profile", "monitoring", "config", "--format", "json")
        assert result.returncode == 0, result.stderr
        services = json.loads(result.stdout)["services"]
        expected = {"watcher", "uploader", "harvester", "sync", "router-scp", "notifier"}
        assert expected <= set(services)
        assert {"rabbitmq", "postgres", "db-upgrade", "prometheus", "grafana"} <= set(services)
        for name, service in services.items():
            if service.get("image", "").startswith("pacsflow"):
                assert cli_accepts(service["command"]), f"{name}: {service['command']}"
                assert service["user"] == "1026:100"  # from .env.example (PUID:PGID)
                assert service["logging"]["driver"] == "json-file"
                assert "max-size" in service["logging"]["options"]
        for name in expected:
            depends = services[name]["depends_on"]
            assert depends["db-upgrade"]["condition"] == "service_completed_successfully"
            assert depends["rabbitmq"]["condition"] == "service_healthy"
            assert "healthz" in " ".join(services[name]["healthcheck"]["test"])

    def test_monitoring_is_a_profile(self) -> None:
        result = compose("2.20.3", "config", "--services")
        assert "grafana" not in result.stdout.split()

    def test_no_secret_in_the_yaml_and_only_simple_env_files(self) -> None:
        raw = yaml.safe_load((ROOT / "compose.yaml").read_text())
        assert not re.search(r"://[^/\s]+:[^@\s]+@", (ROOT / "compose.yaml").read_text())
        for name, service in raw["services"].items():
            for key, value in (service.get("environment") or {}).items():
                if re.search(r"PASS|SECRET|DSN|TOKEN", key) and key != "PACSFLOW_SECRETS_DIR":
                    assert key.endswith("FILE") and str(value).startswith("/run/secrets/"), key
            env_file = service.get("env_file")
            # Compose 2.20 knows env_file as a path or a list of paths, not the long form.
            assert env_file is None or isinstance(env_file, str) or all(
                isinstance(item, str) for item in env_file), name
        for secret in raw["secrets"].values():
            assert secret["file"].startswith("./secrets/")
        examples = {p.name for p in (ROOT / "deploy/compose/secrets.example").iterdir()}
        assert {Path(s["file"]).name for s in raw["secrets"].values()} == examples


def kustomize(folder: str) -> str:
    result = subprocess.run([str(VENV_BIN / "kubectl"), "kustomize", str(ROOT / folder)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


class TestKubernetes:
    @pytest.mark.parametrize("folder", ["deploy/k8s/base", "deploy/k8s/overlays/hospital"])
    def test_rendered_manifests_pass_strict_schema_validation(self, folder: str,
                                                              tmp_path: Path) -> None:
        rendered = tmp_path / "all.yaml"
        rendered.write_text(kustomize(folder))
        result = subprocess.run(
            [str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet", "-k",
             KUBERNETES_VERSION, str(rendered)],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_service_has_probes_limits_and_runs_as_non_root(self) -> None:
        docs = [d for d in yaml.safe_load_all(kustomize("deploy/k8s/base")) if d]
        deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        assert set(deployments) == {"watcher", "uploader", "harvester", "sync", "router-scp",
                                    "notifier"}
        for name, deployment in deployments.items():
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            (container,) = pod["containers"]
            assert cli_accepts(container["args"]), name
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("PodDisruptionBudget", "router-scp") in kinds
        assert ("Service", "router-scp") in kinds
        assert ("Job", "db-upgrade") in kinds

    def test_hospital_overlay_uses_the_external_database(self) -> None:
        docs = [d for d in yaml.safe_load_all(kustomize("deploy/k8s/overlays/hospital")) if d]
        kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("StatefulSet", "postgres") not in kinds
        (postgres,) = [d for d in docs if d["kind"] == "Service"
                       and d["metadata"]["name"] == "postgres"]
        assert postgres["spec"]["type"] == "ExternalName"

    @pytest.mark.parametrize("folder", ["deploy/k8s/base", "deploy/k8s/overlays/hospital"])
    def test_the_configuration_is_valid(self, folder: str, tmp_path: Path) -> None:
        docs = [d for d in yaml.safe_load_all(kustomize(folder)) if d]
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
        path = tmp_path / "pacsflow.yaml"
        path.write_text(config_map["data"]["pacsflow.yaml"])
        result = subprocess.run([str(VENV_BIN / "pacsflow"), "config", "check", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


class TestDockerfile:
    def test_runs_as_non_root_with_a_healthcheck(self) -> None:
        text = (ROOT / "Dockerfile").read_text()
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] not in ("root", "0")
        assert "HEALTHCHECK" in text and "/healthz" in text
        assert re.search(r'^ENTRYPOINT \["pacsflow"\]', text, re.M)

    def test_runtime_dependencies_are_pinned(self) -> None:
        import tomllib

        lock = {line.split("==")[0].lower().replace("_", "-")
                for line in (ROOT / "requirements.lock").read_text().splitlines()
                if line and not line.startswith("#")}
        assert all("==" in line for line in (ROOT / "requirements.lock").read_text().splitlines()
                   if line and not line.startswith("#"))
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        for requirement in project["dependencies"]:
            name = re.split(r"[<>=!~ ]", requirement)[0].lower().replace("_", "-")
            assert name in lock, f"{name} is not pinned in requirements.lock"

    def test_compose_and_k8s_config_files_are_valid(self) -> None:
        result = subprocess.run(
            [str(VENV_BIN / "pacsflow"), "config", "check",
             str(ROOT / "deploy/compose/pacsflow.yaml")],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
