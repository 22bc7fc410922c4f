"""`make deploy-check` passes on the repo's deploy/ and fails, naming the file, on a copy broken
on purpose: a manifest off the Kubernetes schema, a worker without its drain, an alert that does
not parse, a dashboard querying a metric Baton does not export or leaving one out, two panels
with one id or on one spot, a panel query that does not parse, a Prometheus scrape (compose's
or the Kubernetes job) that lost the router's key, a Kubernetes scrape job promtool refuses or
named off what the alerts select, a router pod scraped by annotation again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "check.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def metrics_page(tmp_path_factory):
    """The full check on the repo, against a live baton serve; keeps its /metrics page."""
    page = tmp_path_factory.mktemp("metrics") / "page.txt"
    r = check("--save-metrics-page", str(page))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deploy-check: all good" in r.stdout
    text = page.read_text()
    # the page is a real one: a served request and a refused one left their marks
    assert 'baton:request_success_total{finished_reason="length"} 1.0' in text
    assert 'baton:request_errors_total{status="400"} 1.0' in text
    return page


def test_deploy_check_passes_on_the_repo(metrics_page):
    assert metrics_page.exists()


BREAKS = {
    "schema": (
        "kubernetes/base/decode.yaml",
        "containerPort: 8003",
        'containerPort: "kv"',
        "kubernetes/overlays/",
    ),
    "no drain": (
        "kubernetes/base/prefill.yaml",
        "            preStop:",
        "            postStart:",
        "baton-prefill has no preStop drain",
    ),
    "alert syntax": (
        "prometheus/alerts.yml",
        'expr: up{job="baton-router"} == 0',
        'expr: up{job="baton-router" == 0',
        "prometheus/alerts.yml",
    ),
    "unknown metric": (
        "grafana/dashboards/baton.json",
        "baton:generation_tokens_total",
        "baton:generated_tokens_total",
        "queries baton:generated_tokens_total, which Baton does not export",
    ),
    "metric left off the dashboard": (
        "grafana/dashboards/baton.json",
        "baton:routing_cached_prompt_tokens_total",
        "baton:prompt_tokens_total",
        "no panel shows baton:routing_cached_prompt_tokens, which Baton exports",
    ),
    "duplicate panel id": (
        "grafana/dashboards/baton.json",
        '"id": 17,',
        '"id": 16,',
        "panel id 16 is used twice",
    ),
    "overlapping panels": (
        "grafana/dashboards/baton.json",
        '"x": 12,\n        "y": 57',
        '"x": 6,\n        "y": 57',
        "panel 17 (Requests by placement path) overlaps panel 16",
    ),
    "panel query syntax": (
        "grafana/dashboards/baton.json",
        "sum by (path) (rate(baton:requests_placed_total",
        "sum by (path) (rate((baton:requests_placed_total",
        "query A: does not parse as PromQL",
    ),
    "yaml": (
        "kubernetes/base/disruption.yaml",
        "maxUnavailable: 1",
        "maxUnavailable:  1",
        "yamllint",
    ),
    "compose scrape without the key": (
        "prometheus/prometheus.yml",
        "    authorization:\n      type: Bearer\n"
        "      credentials_file: /run/secrets/baton_api_key\n",
        "",
        "prometheus/prometheus.yml: job baton-router sends no key",
    ),
    "compose key not mounted into prometheus": (
        "docker-compose.yaml",
        "    secrets: [baton_api_key]  # sent on each scrape",
        "    # sent on each scrape",
        "where the prometheus service does not mount compose secret baton_api_key",
    ),
    "kubernetes scrape without the key": (
        "kubernetes/prometheus-scrape.yaml",
        "credentials_file: /etc/prometheus/secrets/baton-api-key/api-key",
        "credentials: ''",
        "kubernetes/prometheus-scrape.yaml: job baton-router sends no key",
    ),
    "kubernetes scrape relabel promtool refuses": (
        "kubernetes/prometheus-scrape.yaml",
        "action: keep",
        "action: kept",
        'unknown relabel action "kept"',
    ),
    "kubernetes scrape service discovery": (
        "kubernetes/prometheus-scrape.yaml",
        "- role: endpoints",
        "- role: endpoint",
        'unknown Kubernetes SD role "endpoint"',
    ),
    "kubernetes scrape job named off the alerts": (
        "kubernetes/prometheus-scrape.yaml",
        "- job_name: baton-router",
        "- job_name: baton",
        "kubernetes/prometheus-scrape.yaml: no scrape job baton-router",
    ),
    "router scraped by annotation": (
        "kubernetes/base/router.yaml",
        "        app.kubernetes.io/component: router\n    # No prometheus.io",
        "        app.kubernetes.io/component: router\n"
        '      annotations:\n        prometheus.io/scrape: "true"\n    # No prometheus.io',
        "baton-router has a prometheus.io/scrape annotation",
    ),
}


# NOTE: a run of the check takes seconds (kustomize, kubernetes-validate, promtool), so breaks in
# different files share a copy; the check reports every problem it finds, so each break's own
# message still shows that break alone fails it. No two breaks of a group touch one file.
GROUPS = [
    (
        "schema", "no drain", "alert syntax", "unknown metric", "yaml",
        "compose scrape without the key", "kubernetes scrape without the key",
        "router scraped by annotation",
    ),
    (
        "metric left off the dashboard", "compose key not mounted into prometheus",
        "kubernetes scrape relabel promtool refuses",
    ),
    ("duplicate panel id", "kubernetes scrape service discovery"),
    ("overlapping panels", "kubernetes scrape job named off the alerts"),
    ("panel query syntax",),
]  # fmt: skip


def test_the_groups_hold_every_break_once_and_one_break_a_file():
    assert sorted(n for g in GROUPS for n in g) == sorted(BREAKS)
    for group in GROUPS:
        paths = [BREAKS[n][0] for n in group]
        assert len(set(paths)) == len(paths), group


@pytest.mark.parametrize("group", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_a_broken_deploy_tree_fails_the_check(tmp_path, metrics_page, group):
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    for name in group:
        path, old, new, _ = BREAKS[name]
        target = copy / path
        text = target.read_text()
        assert old in text, f"{path} no longer holds {old!r}: update this test"
        target.write_text(text.replace(old, new, 1))
    r = check("--deploy-dir", str(copy), "--metrics-page", str(metrics_page))
    assert r.returncode == 1, r.stdout + r.stderr
    for name in group:
        assert BREAKS[name][3] in r.stdout, (name, r.stdout)
