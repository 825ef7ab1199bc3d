"""Static checks of docker-compose.yml and the Prometheus/Grafana provisioning (no Docker engine runs here): the
stack has the services the issue asks for, wired as it asks, and every file, command, port and environment variable
it names exists in the project."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dare.demo import model_name
from tests.shipping.conftest import ROOT, check_dare_command, compose, docker, pinned_version, pyproject

SERVICES = {"redis", "trainer", "api", "prometheus", "grafana", "locust"}


def service(name: str) -> dict:
    return compose()["services"][name]


def env_of(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def option(words: list[str], flag: str) -> str:
    assert flag in words, f"{flag} missing from {words}"
    return words[words.index(flag) + 1]


def container_ports(name: str) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service(name).get("ports", [])}


def test_compose_parses_with_the_expected_services() -> None:
    assert set(compose()["services"]) == SERVICES


def test_redis_is_persistent_and_healthchecked() -> None:
    redis = service("redis")
    command = redis["command"]
    assert option(command, "--appendonly") == "yes"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_builds_use_dockerfile_targets() -> None:
    assert service("trainer")["build"]["target"] == "train"
    assert service("api")["build"]["target"] == "serve"
    for name in ("trainer", "api"):
        assert service(name)["build"]["target"] in docker().stages
        assert (ROOT / service(name)["build"]["context"] / "Dockerfile").is_file()


def test_start_order() -> None:
    api_deps = service("api")["depends_on"]
    assert api_deps["trainer"]["condition"] == "service_completed_successfully"
    assert api_deps["redis"]["condition"] == "service_healthy"
    assert service("trainer")["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service("trainer").get("restart") == "no", "the trainer is one-shot"
    assert service("locust")["profiles"] == ["loadtest"]
    assert all("profiles" not in service(s) for s in SERVICES - {"locust"})


@pytest.mark.parametrize("name", ["trainer", "api"])
def test_commands_are_real_dare_subcommands(name: str) -> None:
    check_dare_command(service(name)["command"], f"docker-compose.yml {name}")


def test_trainer_builds_four_attention_dims_and_the_default_model_is_one_of_them() -> None:
    command = service("trainer")["command"]
    dims = [int(d) for d in option(command, "--att-dims").split(",")]
    assert dims == [16, 32, 64, 128]
    assert "--no-serve" in command
    built = {model_name(d) for d in dims}
    assert env_of("api")["DARE_DEFAULT_MODEL"] in built
    assert env_of("locust")["DARE_LOADTEST_MODEL"] in built


def test_environment_variables_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.core.config import Settings

    for name in ("trainer", "api"):
        for var in env_of(name):
            assert var.startswith("DARE_") and var[5:].lower() in Settings.model_fields, (
                f"docker-compose.yml {name}: {var} is not a field of service.core.config.Settings"
            )
    from loadtest.scenario import ScenarioSettings

    scenario = (ROOT / "loadtest" / "scenario.py").read_text(encoding="utf-8")
    for var in env_of("locust"):
        assert f'"{var}"' in scenario, f"docker-compose.yml locust: loadtest/scenario.py never reads {var}"
        monkeypatch.setenv(var, env_of("locust")[var])
    settings = ScenarioSettings.from_env()
    assert settings.model == env_of("locust")["DARE_LOADTEST_MODEL"]
    assert str(settings.data) == env_of("locust")["DARE_LOADTEST_DATA"]


def test_redis_url_points_at_the_redis_service() -> None:
    for name in ("trainer", "api"):
        url = env_of(name)["DARE_REDIS_URL"]
        assert re.fullmatch(r"redis://redis:6379/\d+", url), url


def test_models_volume_is_shared_and_matches_the_commands() -> None:
    trainer_out = option(service("trainer")["command"], "--models")
    api_in = option(service("api")["command"], "--models")
    assert env_of("api")["DARE_MODELS_DIR"] == api_in
    mounts = {n: {str(v).split(":")[1]: str(v).split(":")[0] for v in service(n)["volumes"]} for n in ("trainer", "api")}
    assert mounts["trainer"][trainer_out] == mounts["api"][api_in] == "models"


def test_volumes_exist() -> None:
    declared = set(compose().get("volumes", {}))
    for name, spec in compose()["services"].items():
        for volume in spec.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"docker-compose.yml {name}: bind-mount source {source} is missing"
            else:
                assert source in declared, f"docker-compose.yml {name}: named volume {source} is not declared"


def test_ports_are_consistent() -> None:
    api_port = int(option(service("api")["command"], "--port"))
    assert container_ports("api") == {api_port}
    assert api_port in {int(p) for e in docker().stages["serve"].of("EXPOSE") for p in e.value.split()}
    assert option(service("locust")["command"], "--host") == f"http://api:{api_port}"
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"api:{api_port}"]
    assert container_ports("prometheus") == {9090}
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert container_ports("grafana") == {3000}
    assert container_ports("locust") == {8089}
    host_ports = [str(p).rsplit(":", 2)[-2] for s in SERVICES for p in service(s).get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), f"two services publish one host port: {host_ports}"


# -------------------------------------------------------------------------------------------------------------
# Safe by default: secrets from .env, no unauthenticated writes, dashboards on localhost, the CPU torch build
# -------------------------------------------------------------------------------------------------------------

REQUIRED = re.compile(r"^\$\{([A-Z_]+):\?.+\}$")  # `${VAR:?message}`: compose stops when VAR is unset or empty


def test_the_api_token_and_grafana_password_are_required_from_the_env_file() -> None:
    api = env_of("api")
    assert REQUIRED.match(api["DARE_API_TOKEN"]).group(1) == "DARE_API_TOKEN", api["DARE_API_TOKEN"]
    assert api["DARE_ADMIN_TOKEN"] == "${DARE_ADMIN_TOKEN:-}", "an empty admin token falls back to the API token"
    assert REQUIRED.match(env_of("locust")["DARE_LOADTEST_TOKEN"]).group(1) == "DARE_API_TOKEN"
    grafana = env_of("grafana")
    assert REQUIRED.match(grafana["GF_SECURITY_ADMIN_PASSWORD"]).group(1) == "GRAFANA_ADMIN_PASSWORD"
    assert "GF_SECURITY_ADMIN_USER" not in grafana or grafana.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer"
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous visitors may only look"


def test_env_example_names_every_variable_and_env_stays_out_of_git_and_images() -> None:
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )  # fmt: skip
    assert used == set(example), f"docker-compose.yml uses {sorted(used)}, .env.example names {sorted(example)}"
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Z_]+):\?", text)}
    assert required == {"DARE_API_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
    assert all(example[name] == "" for name in required | {"DARE_ADMIN_TOKEN"}), "the example must hold no secret"
    assert example["DARE_BIND"] == "127.0.0.1"
    if (ROOT / ".git").exists() and shutil.which("git"):
        ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30).returncode
        assert ignored == 0, ".env is not git-ignored"
        tracked = subprocess.run(["git", "ls-files", ".env.example"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=30).stdout.strip()  # fmt: skip
        assert tracked == ".env.example"
    from tests.shipping import dockerfile

    assert dockerfile.is_ignored(".env", dockerfile.dockerignore_patterns(ROOT / ".dockerignore")), (
        ".env would be sent into the image build context"
    )


def test_only_the_api_is_published_beyond_localhost_by_default() -> None:
    for name in SERVICES:
        for port in service(name).get("ports", []):
            host = str(port).rsplit(":", 2)
            if name == "api":
                assert len(host) == 2, f"api publishes {port}"  # every write there needs the token
            else:
                assert len(host) == 3 and host[0] == "${DARE_BIND:-127.0.0.1}", f"{name} publishes {port}"


def test_trainer_builds_the_cpu_torch_by_default() -> None:
    args = service("trainer")["build"]["args"]
    assert args["TORCH"] == "cpu"
    train_args = {a.value.split("=", 1)[0] for a in docker().stages["train"].of("ARG")}
    assert "TORCH" in train_args, "TORCH is no build arg of the train stage"
    assert "build" in service("api") and "args" not in service("api")["build"], "the serve image takes no torch"


def compose_test_module() -> Any:
    """deploy/compose_test.py, which is a script, loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compose_test", ROOT / "deploy/compose_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_refuses_to_run_without_the_token() -> None:
    """podman-compose resolves the file as `docker compose` does: without DARE_API_TOKEN it stops, naming it."""
    podman_compose = compose_test_module().podman_compose_tool()
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (podman-compose checks for it before it reads the file)")
    env = {k: v for k, v in os.environ.items() if k not in ("DARE_API_TOKEN", "GRAFANA_ADMIN_PASSWORD")}
    cmd = [podman_compose, "--env-file", os.devnull, "-f", str(ROOT / "docker-compose.yml"), "config"]
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "required variable DARE_API_TOKEN is missing a value" in refused.stderr
    env.update(DARE_API_TOKEN="t0ken", GRAFANA_ADMIN_PASSWORD="pw")
    accepted = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    rendered = yaml.safe_load(accepted.stdout)["services"]
    assert rendered["api"]["environment"]["DARE_API_TOKEN"] == "t0ken"
    assert rendered["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]


def test_locust_image_matches_the_pinned_locust() -> None:
    image = service("locust")["image"]
    pin = pinned_version(pyproject()["project"]["optional-dependencies"]["dev"], "locust")
    assert image == f"locustio/locust:{pin}"
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service("locust")["volumes"]}
    locustfile = Path(option(service("locust")["command"], "-f"))
    host_dir = ROOT / mounts[str(locustfile.parent)]
    assert (host_dir / locustfile.name).is_file() and (host_dir / "scenario.py").is_file()
    data = env_of("locust")["DARE_LOADTEST_DATA"]
    host_dir = next(src for dst, src in mounts.items() if data.startswith(dst + "/"))
    assert (ROOT / host_dir / Path(data).name).is_file()


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service("grafana")["volumes"]}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dare.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert path in mounts and (ROOT / mounts[path] / "dare.json").is_file()
    assert (ROOT / mounts["/etc/grafana/provisioning"] / "datasources").is_dir()
    home = dict(service("grafana")["environment"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/dare.json"


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`; `make test` installs it in CI)")
    result = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------------------------------------
# deploy/compose.local.yml: the override `make compose-test` runs (host network, local images, own Redis port)
# -------------------------------------------------------------------------------------------------------------


def local() -> dict:
    return yaml.safe_load((ROOT / "deploy/compose.local.yml").read_text(encoding="utf-8"))


def default_of(value: str) -> str:
    """`${VAR:-default}` -> default (compose interpolation of an unset variable)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_local_override_changes_only_known_services_and_runs_every_started_one_on_the_host_network() -> None:
    override = local()["services"]
    assert set(override) <= SERVICES, f"the override names services docker-compose.yml lacks: {set(override) - SERVICES}"
    assert override["grafana"]["profiles"] == ["grafana"], "grafana cannot be installed here: it must not start"
    for name in SERVICES - {"grafana", "locust"}:
        spec = override[name]
        assert spec["network_mode"] == "host", name
        assert spec["ulimits"]["nofile"] == {"soft": 1024, "hard": 1024}, name
        assert spec["ulimits"]["nproc"] == {"soft": 1024, "hard": 1024}, name


def test_local_redis_never_uses_the_hosts_default_port() -> None:
    override = local()["services"]
    command = override["redis"]["command"]
    assert command[: len(service("redis")["command"])] == service("redis")["command"], "the base persistence flags"
    port = default_of(option(command, "--port"))
    assert option(command, "--bind") == "127.0.0.1"
    assert port != "6379" and "DARE_COMPOSE_REDIS_PORT" in option(command, "--port")
    assert default_of(option(override["redis"]["healthcheck"]["test"], "-p")) == port
    for name in ("trainer", "api"):
        assert default_of(override[name]["environment"]["DARE_REDIS_URL"]) == f"redis://127.0.0.1:{port}/0"


def test_local_api_and_prometheus_match_the_base_ports_and_scrape_target() -> None:
    override = local()["services"]
    api = override["api"]["command"]
    check_dare_command(api, "deploy/compose.local.yml api")
    base_api = service("api")["command"]
    assert option(api, "--port") == option(base_api, "--port") and option(api, "--host") == "127.0.0.1"
    assert option(api, "--workers") == option(base_api, "--workers")
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    target_host, target_port = prom["scrape_configs"][0]["static_configs"][0]["targets"][0].split(":")
    assert f"{target_host}:127.0.0.1" in override["prometheus"]["extra_hosts"]
    assert target_port == option(api, "--port")
    listen = next(a for a in override["prometheus"]["command"] if a.startswith("--web.listen-address="))
    assert listen.endswith(":9090") and container_ports("prometheus") == {9090}


def test_local_images_are_the_ones_make_images_names() -> None:
    script = (ROOT / "deploy/images.sh").read_text(encoding="utf-8")
    written = set(re.findall(r"^(DARE_[A-Z_]+_IMAGE)=", script, flags=re.M))
    for name, spec in local()["services"].items():
        if "image" not in spec:
            continue
        var = re.fullmatch(r"\$\{(DARE_[A-Z_]+_IMAGE):-([^}]+)\}", spec["image"])
        assert var, f"deploy/compose.local.yml {name}: image {spec['image']} is not ${{DARE_..._IMAGE:-default}}"
        assert var.group(1) in written, f"{var.group(1)} is not written to var/images.env by deploy/images.sh"
        assert var.group(2).split("/")[-1] in script, f"{name}: default image {var.group(2)} is not built by images.sh"


def test_compose_test_starts_the_services_in_depends_on_order() -> None:
    order, depends = compose_test_module().stack_services()
    assert order == ["redis", "trainer", "api", "prometheus"], order
    assert depends["api"] == {"trainer": "service_completed_successfully", "redis": "service_healthy"}
