"""deploy/ checked without a container runtime: the compose file, nginx, Prometheus and
Grafana configs agree with each other, the gateway config passes the gateway's own strict
validation, and the dashboard's queries name metrics that /metrics really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tierroute.gateway.metrics import Metrics
from tierroute.gateway.settings import GatewayFile, parse_settings
from tierroute.ledger import Ledger

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
GATEWAYS = ["gateway1", "gateway2", "gateway3"]
BACKEND_KEYS = ("ledger", "state")  # issue 12 items 1 and 2


def load(name: str) -> Any:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load("compose.yaml")
    assert isinstance(doc, dict)
    return doc


def gateway_port(service: dict[str, Any]) -> str:
    command = service["command"]
    return str(command[command.index("--port") + 1])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host source of a service's volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_compose_services_volumes_ports_and_dependencies_are_consistent(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {*GATEWAYS, "lb", "postgres", "redis", "prometheus", "grafana"}
    named = set(compose.get("volumes") or {})
    used_named = set()
    published = []
    for name, service in services.items():
        assert "image" in service, f"{name} has no image"
        for target, source in mounts(service).items():
            assert target.startswith("/"), f"{name}: {target}"
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in named, f"{name} uses volume {source}, not declared"
                used_named.add(source)
        for port in service.get("ports", []):
            published.append(str(port).split(":")[0])
        depends = service.get("depends_on", [])
        for other in depends:
            assert other in services, f"{name} depends on unknown {other}"
    assert used_named == named, f"declared but unused volumes: {named - used_named}"
    assert len(published) == len(set(published)), f"a host port is published twice: {published}"
    for name in GATEWAYS:
        gw = services[name]
        build = gw["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        assert gateway_port(gw) in {str(p) for p in gw["expose"]}
        assert "--host" in gw["command"] and "0.0.0.0" in gw["command"]
        config = gw["command"][gw["command"].index("--config") + 1]
        assert mounts(gw)[config] == "./gateway.yaml"
        assert gw["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert gw["depends_on"]["redis"]["condition"] == "service_healthy"
    # the three replicas are one definition: they cannot drift apart
    assert services["gateway1"] == services["gateway2"] == services["gateway3"]


def test_nginx_balances_over_every_replica(compose: dict[str, Any]) -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    upstream = re.search(r"upstream tierroute \{(.*?)\}", conf, re.S)
    assert upstream is not None
    servers = re.findall(r"server\s+([\w.-]+):(\d+)", upstream.group(1))
    services = compose["services"]
    assert sorted(servers) == sorted((g, gateway_port(services[g])) for g in GATEWAYS)
    listen = re.search(r"listen\s+(\d+);", conf)
    assert listen is not None
    lb = services["lb"]
    assert f"{lb['ports'][0]}".split(":")[1] == listen.group(1)
    assert mounts(lb)["/etc/nginx/nginx.conf"] == "./nginx.conf"
    assert "proxy_buffering off" in conf  # streamed answers are not held back


def test_prometheus_scrapes_every_replica(compose: dict[str, Any]) -> None:
    prom = load("prometheus.yml")
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    services = compose["services"]
    assert sorted(targets) == sorted(f"{g}:{gateway_port(services[g])}" for g in GATEWAYS)
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"


def test_metrics_are_open_to_prometheus_only(compose: dict[str, Any]) -> None:
    """The replicas serve /metrics without a key (Prometheus has none) only because the
    load balancer, the one published port, does not pass /metrics on."""
    assert deploy_config()["gateway"]["public_metrics"] is True
    conf = (DEPLOY / "nginx.conf").read_text()
    hidden = re.search(r"location = /metrics \{\s*return 404;", conf)
    assert hidden is not None and conf.index("location = /metrics") < conf.index("location / {")
    for name in GATEWAYS:  # no replica publishes a port of its own
        assert "ports" not in compose["services"][name]


def deploy_config() -> dict[str, Any]:
    doc = load("gateway.yaml")
    assert isinstance(doc, dict)
    return doc


def schema_knows(key: str) -> bool:
    return key in GatewayFile.model_fields


def test_gateway_config_passes_the_gateways_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = deploy_config()
    # The service names in the URLs are the compose file's.
    assert re.fullmatch(r"postgresql://\w+:\w+@postgres:5432/\w+", doc["ledger"])
    assert re.fullmatch(r"redis://redis:6379/\d+", doc["state"])
    known = {k: v for k, v in doc.items() if k not in BACKEND_KEYS or schema_knows(k)}
    settings = parse_settings(known, "deploy/gateway.yaml")
    assert [t.name for t in settings.tiers] == ["small", "large"]
    assert all(t.kind == "openai" and t.api_key_env == "OPENAI_API_KEY" for t in settings.tiers)
    compose_env = load("compose.yaml")["services"]["gateway1"]["environment"]
    assert "OPENAI_API_KEY" in compose_env


@pytest.mark.parametrize("key", BACKEND_KEYS)
def test_gateway_config_backend_keys_are_known_to_the_schema(key: str) -> None:
    if not schema_knows(key):
        pytest.skip(f"'{key}:' is not in the gateway schema yet (issue 12 items 1-2)")
    # the key with everything else the schema knows (the other backend key may land later)
    doc = {k: v for k, v in deploy_config().items() if k == key or k not in BACKEND_KEYS}
    parse_settings(doc, "deploy/gateway.yaml")


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Every sample name /metrics can export: a fresh gateway's Metrics with its ledger."""
    metrics = Metrics()
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        metrics.watch_ledger(ledger.health)
        text = metrics.render().decode()
    finally:
        ledger.close()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            names.add(name)
    return names


def dashboard() -> dict[str, Any]:
    doc = json.loads((DEPLOY / "grafana" / "dashboards" / "tierroute.json").read_text())
    assert isinstance(doc, dict)
    return doc


def test_dashboard_queries_name_exported_metrics_and_configured_tiers(tmp_path: Path) -> None:
    exported = exported_metric_names(tmp_path)
    assert "tierroute_requests_total" in exported and "tierroute_routing_batch_size_sum" in exported
    doc = dashboard()
    panels = doc["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    tiers = {t["name"] for t in deploy_config()["tiers"]}
    datasource = load("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    exprs = []
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["targets"], f"panel {panel['title']} has no query"
        for target in panel["targets"]:
            exprs.append(target["expr"])
            assert target["datasource"]["uid"] == datasource["uid"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    named = {m for e in exprs for m in re.findall(r"\btierroute_[a-z0-9_]+", e)}
    assert named, "the dashboard queries no tierroute metric"
    assert named <= exported, f"not exported by /metrics: {sorted(named - exported)}"
    for tier in {t for e in exprs for t in re.findall(r'tier="(\w+)"', e)}:
        assert tier in tiers, f"the dashboard names tier {tier}, not in deploy/gateway.yaml"
    # every panel a row of the 24-column grid
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)


def test_grafana_provisioning_points_at_the_mounted_dashboard(compose: dict[str, Any]) -> None:
    grafana = mounts(compose["services"]["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = load("grafana/provisioning/dashboards/tierroute.yml")["providers"][0]
    folder = provider["options"]["path"]
    assert grafana[folder] == "./grafana/dashboards"
    datasource = load("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    prom_port = compose["services"]["prometheus"]["ports"][0].split(":")[1]
    assert datasource["url"] == f"http://prometheus:{prom_port}"
    env = compose["services"]["grafana"]["environment"]
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(folder)
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()


def test_dockerfile_copies_what_exists_and_installs_known_extras() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which is missing"
    extras = re.search(r"^ARG EXTRAS=(\S+)$", text, re.M)
    assert extras is not None
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in extras.group(1).split(","):
        assert extra in declared, f"the Dockerfile installs extra '{extra}', not in pyproject"


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no docker compose here: the file is checked by the tests above instead",
)
def test_docker_compose_accepts_the_file() -> None:
    subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        check=True,
        timeout=60,
    )


def _docker_compose_runs() -> bool:
    """A Docker daemon answers and compose v2 is installed."""
    if shutil.which("docker") is None:
        return False
    for command in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            if subprocess.run(command, capture_output=True, timeout=20).returncode != 0:
                return False
        except subprocess.TimeoutExpired:
            return False
    return True


def test_the_offline_override_rebuilds_every_registry_image_but_grafana(
    compose: dict[str, Any],
) -> None:
    offline = load("compose.offline.yaml")["services"]
    for name in compose["services"]:
        if name.startswith("gateway"):
            assert offline[name]["build"]["args"]["PYTHON_IMAGE"] == "tierroute-offline/python"
            assert mounts(offline[name])["/etc/tierroute/gateway.yaml"] == "./offline/gateway.yaml"
        elif name == "grafana":  # no Debian package: off unless its profile is asked for
            assert offline[name]["profiles"] == ["grafana"]
        else:
            assert offline[name]["image"].startswith("tierroute-offline/"), name
            assert offline[name]["build"]["target"] == {"lb": "nginx"}.get(name, name)


def test_the_offline_gateway_config_is_the_shipped_one_on_a_local_upstream() -> None:
    script = (DEPLOY / "offline" / "run.sh").read_text()
    shipped = (DEPLOY / "gateway.yaml").read_text()
    assert "s#https://api.openai.com/v1#http://upstream:9000/v1#" in script
    offline = yaml.safe_load(
        shipped.replace("https://api.openai.com/v1", "http://upstream:9000/v1")
    )
    parse_settings(offline, "deploy/offline/gateway.yaml")
    remote = [t for t in offline["tiers"] if t.get("kind") == "openai"]
    assert remote and all(t["base_url"] == "http://upstream:9000/v1" for t in remote)


@pytest.mark.skipif(
    not _docker_compose_runs(),
    reason="no Docker daemon with compose v2 here: deploy/offline/run.sh starts the stack "
    "where there is one (the tests above check the files)",
)
def test_the_stack_starts_answers_and_keeps_its_books_with_a_replica_killed() -> None:
    """deploy/offline/run.sh for real: three replicas, nginx, PostgreSQL, Redis, Prometheus;
    the script exits non-zero unless the ledger holds the answered requests' rows (but the
    killed replica's unflushed batch), Redis holds state and Prometheus scrapes."""
    done = subprocess.run(
        ["bash", str(DEPLOY / "offline" / "run.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "REQUESTS": "200"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== ok" in done.stdout
