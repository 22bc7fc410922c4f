"""Validate everything under deploy/ offline; exit 1 naming each problem found.

- YAML lint of every YAML file (yamllint, config in deploy/.yamllint).
- Each Kustomize overlay rendered (kubectl kustomize) and validated against the Kubernetes
  schemas (kubernetes-validate --strict), then checked for what Baton relies on: every worker
  Deployment has startup, readiness and liveness probes, a preStop drain and a grace period
  longer than its drain; the GPU overlay asks for GPUs; every PodDisruptionBudget, Service and
  HorizontalPodAutoscaler points at something that exists; every HPA metric has an adapter rule;
  the router pod carries no `prometheus.io/scrape` annotation (it cannot send a key).
- Prometheus: `promtool check config` on the scrape configs (compose's, and the Kubernetes
  scrape job wrapped in a config of its own), `promtool check rules` on the alerts, and
  `promtool check metrics` on a real /metrics page of a running `baton serve` that has served a
  request (and refused one). Every scrape of the router sends a key (its /metrics asks for
  one), and every `job="..."` the alerts and the dashboard select is a job both setups define.
- Every metric the alerts, the dashboard and the adapter rules query is one Baton exports
  (read off that same page), and every metric Baton exports is on some dashboard panel.
- The dashboard is well-formed: panel ids unique, panels inside the 24-column grid and not
  overlapping, every panel and query on the `${datasource}` variable, refIds unique within a
  panel, and every query parses as PromQL (`promtool check rules`, Grafana's `$__*` variables
  replaced by a range).
- The Dockerfile runs as a non-root user with a health check on /health; docker-compose's
  services and Prometheus' targets agree, and Prometheus sends the router's key from the same
  compose secret the router reads it from.

    python deploy/check.py                      # what `make deploy-check` runs
    python deploy/check.py --deploy-dir /tmp/x  # a copy (the tests break one on purpose)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
K8S_VERSION = "1.33.0"
METRIC = re.compile(r"\bbaton:[A-Za-z0-9_:]+")
JOB = re.compile(r'\bjob\s*=\s*"([^"]*)"')  # a job="..." selector, in a query
K8S_SCRAPE = "kubernetes/prometheus-scrape.yaml"
GRAFANA_RANGE = re.compile(r"\$\{?__(rate_interval|interval|range)\}?")  # Grafana's, in a query
BIN = Path(sys.executable).parent  # tools installed beside this interpreter come first


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"deploy-check: `{name}` is not installed (make deploy-tools)")
    return found


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


class Check:
    def __init__(self, deploy: Path) -> None:
        self.deploy = deploy
        self.problems: list[str] = []

    def fail(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    # ---- YAML ---------------------------------------------------------------------------------

    def yaml_lint(self) -> None:
        files = sorted(str(p) for p in self.deploy.rglob("*.y*ml"))
        r = run([tool("yamllint"), "-f", "parsable", "-c", str(self.deploy / ".yamllint"), *files])
        if r.returncode != 0:
            for line in (r.stdout + r.stderr).strip().splitlines():
                self.fail("yamllint", line)

    # ---- Kubernetes ---------------------------------------------------------------------------

    def kubernetes(self) -> list[dict]:
        rendered = []
        for overlay in sorted((self.deploy / "kubernetes" / "overlays").iterdir()):
            r = run([tool("kubectl"), "kustomize", str(overlay)])
            where = f"kubernetes/overlays/{overlay.name}"
            if r.returncode != 0:
                self.fail(where, f"kustomize: {r.stderr.strip()}")
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(r.stdout)
            try:
                v = run(
                    [tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, "--quiet", f.name]
                )
            finally:
                os.unlink(f.name)
            if v.returncode != 0:
                for line in (v.stdout + v.stderr).strip().splitlines():
                    self.fail(where, line.replace(f.name, "rendered"))
            docs = [d for d in yaml.safe_load_all(r.stdout) if d]
            self.baton_rules(where, overlay.name, docs)
            rendered += docs
        return rendered

    def baton_rules(self, where: str, overlay: str, docs: list[dict]) -> None:
        by_kind: dict[str, dict[str, dict]] = {}
        for d in docs:
            by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
        deployments = by_kind.get("Deployment", {})
        pod_labels = {
            n: d["spec"]["template"]["metadata"].get("labels", {}) for n, d in deployments.items()
        }

        def selects(selector: dict) -> bool:
            return any(selector.items() <= labels.items() for labels in pod_labels.values())

        for name in ("baton-router", "baton-prefill", "baton-decode"):
            if name not in deployments:
                self.fail(where, f"no Deployment {name}")
        router = deployments.get("baton-router")
        if router is not None:
            annotations = router["spec"]["template"]["metadata"].get("annotations", {})
            if "prometheus.io/scrape" in annotations:
                self.fail(
                    where,
                    "baton-router has a prometheus.io/scrape annotation, which cannot send the "
                    "key /metrics asks for: scrape it with kubernetes/prometheus-scrape.yaml",
                )
        for name in ("baton-prefill", "baton-decode"):
            d = deployments.get(name)
            if d is None:
                continue
            pod = d["spec"]["template"]["spec"]
            c = pod["containers"][0]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in c:
                    self.fail(where, f"{name} has no {probe}")
            if "preStop" not in c.get("lifecycle", {}):
                self.fail(where, f"{name} has no preStop drain")
            drain = next((a for a in c.get("args", []) if a.startswith("--drain-timeout")), None)
            if drain is None:
                self.fail(where, f"{name} does not set --drain-timeout")
            if pod.get("terminationGracePeriodSeconds", 30) <= 60:
                self.fail(where, f"{name}: terminationGracePeriodSeconds must outlast the drain")
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if overlay == "gpu" and gpus is None:
                self.fail(where, f"{name} requests no GPU")
        for pdb in by_kind.get("PodDisruptionBudget", {}).values():
            if not selects(pdb["spec"]["selector"]["matchLabels"]):
                self.fail(where, f"PodDisruptionBudget {pdb['metadata']['name']} selects no pod")
        for svc in by_kind.get("Service", {}).values():
            if not selects(svc["spec"]["selector"]):
                self.fail(where, f"Service {svc['metadata']['name']} selects no pod")
        rules = self.adapter_metrics()
        for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
            hname = hpa["metadata"]["name"]
            if hpa["spec"]["scaleTargetRef"]["name"] not in deployments:
                self.fail(where, f"HorizontalPodAutoscaler {hname} scales nothing that exists")
            for metric in hpa["spec"]["metrics"]:
                ext = metric.get("external", {}).get("metric", {}).get("name")
                if ext is not None and ext not in rules:
                    self.fail(where, f"HPA {hname} reads {ext}, which no adapter rule serves")

    def adapter_metrics(self) -> dict[str, str]:
        path = self.deploy / "kubernetes" / "prometheus-adapter.yaml"
        rules = yaml.safe_load(path.read_text())["rules"]["external"]
        return {r["name"]["as"]: r["metricsQuery"] for r in rules}

    # ---- Prometheus ---------------------------------------------------------------------------

    def prometheus(self) -> None:
        promtool = tool("promtool")
        prom = self.deploy / "prometheus"
        for cfg in sorted(prom.glob("prometheus*.yml")):
            # --syntax-only: the files it names (rules, credentials) exist in the container only
            r = run([promtool, "check", "config", "--syntax-only", str(cfg)])
            if r.returncode != 0:
                self.fail(f"prometheus/{cfg.name}", (r.stdout + r.stderr).strip())
        r = run([promtool, "check", "rules", str(prom / "alerts.yml")])
        if r.returncode != 0:
            self.fail("prometheus/alerts.yml", (r.stdout + r.stderr).strip())
        jobs = {"prometheus/prometheus.yml": prometheus_jobs(prom / "prometheus.yml")}
        jobs[K8S_SCRAPE] = self.kubernetes_scrape()
        selected = selected_jobs(self.deploy)
        for where, defined in jobs.items():
            for job in sorted(selected - {j.get("job_name") for j in defined}):
                self.fail(where, f"no scrape job {job}, which the alerts or the dashboard select")

    def kubernetes_scrape(self) -> list[dict]:
        """The Kubernetes scrape jobs (a `scrape_configs` list), checked by promtool inside a
        config of their own; each must send a key."""
        try:
            jobs = yaml.safe_load((self.deploy / K8S_SCRAPE).read_text())
        except (OSError, yaml.YAMLError) as e:
            self.fail(K8S_SCRAPE, f"cannot read it: {e}")
            return []
        if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs) or not jobs:
            self.fail(K8S_SCRAPE, "not a list of scrape jobs (a `scrape_configs` entry)")
            return []
        checked = jobs
        if not promtool_config_ok({"scrape_configs": [{"job_name": "sd", **K8S_SD_PROBE}]})[0]:
            # NOTE: Debian's promtool is built without Kubernetes service discovery: it gets
            # each job with a static target in its place, and kubernetes_sd_configs is checked here.
            checked = []
            for job in jobs:
                for problem in kubernetes_sd_problems(job.get("kubernetes_sd_configs", [])):
                    self.fail(K8S_SCRAPE, f"job {job.get('job_name')}: {problem}")
                job = {k: v for k, v in job.items() if k != "kubernetes_sd_configs"}
                checked.append({**job, "static_configs": [{"targets": ["baton-router:8000"]}]})
        ok, out = promtool_config_ok({"scrape_configs": checked}, K8S_SCRAPE)
        if not ok:
            self.fail(K8S_SCRAPE, out)
        for job in jobs:
            if not job.get("authorization", {}).get("credentials_file"):
                self.fail(
                    K8S_SCRAPE,
                    f"job {job.get('job_name')} sends no key (authorization: credentials_file), "
                    "and the router's /metrics asks for one",
                )
        return jobs

    def metrics_page(self, page: str) -> None:
        r = run([tool("promtool"), "check", "metrics"], input=page)
        # NOTE: promtool's lint asks for base units and _total on counters; Baton's names follow
        # vLLM's (kv_cache_usage_perc), so only hard errors (exit 2 or a parse error) fail.
        if r.returncode not in (0, 3) and "error" in (r.stdout + r.stderr).lower():
            self.fail("/metrics", (r.stdout + r.stderr).strip())
        exported = exported_series(page)
        queries = {"dashboard": dashboard_queries(self.deploy / "grafana" / "dashboards")}
        queries["alerts"] = [
            rule["expr"]
            for group in yaml.safe_load((self.deploy / "prometheus" / "alerts.yml").read_text())[
                "groups"
            ]
            for rule in group["rules"]
        ]
        queries["prometheus-adapter"] = list(self.adapter_metrics().values())
        for where, exprs in queries.items():
            for expr in exprs:
                for name in METRIC.findall(expr):
                    if name not in exported:
                        self.fail(where, f"queries {name}, which Baton does not export")
        shown = {name for expr in queries["dashboard"] for name in METRIC.findall(expr)}
        for family, series in sorted(exported_families(page).items()):
            if family.startswith("baton:") and not series & shown:
                self.fail("dashboard", f"no panel shows {family}, which Baton exports")

    # ---- Grafana --------------------------------------------------------------------------------

    def dashboards(self) -> None:
        queries: dict[str, str] = {}  # "<file> panel <id> (<title>), query <refId>" -> PromQL
        for path in sorted((self.deploy / "grafana" / "dashboards").glob("*.json")):
            where = f"grafana/dashboards/{path.name}"
            try:
                dash = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                self.fail(where, f"not JSON: {e}")
                continue
            self.dashboard_layout(where, dash)
            for panel in all_panels(dash):
                name = f"panel {panel.get('id')} ({panel.get('title', '')})"
                targets = panel.get("targets", [])
                if panel.get("type") == "row":
                    if targets:
                        self.fail(where, f"{name} is a row, which runs no queries")
                    continue
                if panel.get("datasource", {}).get("uid") != "${datasource}":
                    self.fail(where, f"{name} is not on the ${{datasource}} variable")
                refs: set[str] = set()
                for t in targets:
                    ref = t.get("refId")
                    if ref is None or ref in refs:
                        self.fail(where, f"{name}: refId {ref!r} missing or used twice")
                    refs.add(ref)
                    if t.get("datasource", {}).get("uid") != "${datasource}":
                        self.fail(
                            where, f"{name}, query {ref}: not on the ${{datasource}} variable"
                        )
                    if not t.get("expr"):
                        self.fail(where, f"{name}, query {ref}: no expr")
                        continue
                    key = f"{where} {name}, query {ref}"
                    while key in queries:  # a duplicate id or refId, failed above
                        key += "'"
                    queries[key] = GRAFANA_RANGE.sub("5m", t["expr"])
        self.promql(queries)

    def dashboard_layout(self, where: str, dash: dict) -> None:
        """Ids unique across the dashboard; each panel inside the 24-column grid; the top-level
        panels (rows included) do not overlap, nor do those inside one collapsed row."""
        ids: dict[object, str] = {}
        layers = [dash.get("panels", [])]
        layers += [p.get("panels", []) for p in layers[0] if p.get("type") == "row"]
        for layer in layers:
            placed: list[tuple[str, dict]] = []
            for panel in layer:
                pid, title = panel.get("id"), panel.get("title", "")
                name = f"panel {pid} ({title})"
                if not isinstance(pid, int):
                    self.fail(where, f"panel {title!r} has no numeric id")
                elif pid in ids:
                    self.fail(where, f"panel id {pid} is used twice ({ids[pid]!r}, {title!r})")
                else:
                    ids[pid] = title
                g = panel.get("gridPos", {})
                if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")):
                    self.fail(where, f"{name} has no gridPos h, w, x and y")
                    continue
                if min(g["x"], g["y"]) < 0 or min(g["w"], g["h"]) < 1 or g["x"] + g["w"] > 24:
                    self.fail(where, f"{name} lies outside the 24-column grid: {g}")
                for other, o in placed:
                    if (
                        g["x"] < o["x"] + o["w"]
                        and o["x"] < g["x"] + g["w"]
                        and g["y"] < o["y"] + o["h"]
                        and o["y"] < g["y"] + g["h"]
                    ):
                        self.fail(where, f"{name} overlaps {other}")
                placed.append((name, g))

    def promql(self, queries: dict[str, str]) -> None:
        """Every query parses: promtool reads each as a recording rule, one group apiece."""
        if not queries:
            return
        groups = [
            {"name": k, "rules": [{"record": "dashboard", "expr": v}]} for k, v in queries.items()
        ]
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
            yaml.safe_dump({"groups": groups}, f)
        try:
            r = run([tool("promtool"), "check", "rules", f.name])
        finally:
            os.unlink(f.name)
        if r.returncode == 0:
            return
        out = (r.stdout + r.stderr).replace(f.name, "dashboard queries")
        found = re.findall(r'group "(.*)", rule \d+, "dashboard": could not parse (.*)', out)
        for where, why in found:
            self.fail(where, f"does not parse as PromQL: {why.removeprefix('expression: ')}")
        if not found:
            self.fail("grafana/dashboards", out.strip())

    # ---- containers -----------------------------------------------------------------------------

    def containers(self) -> None:
        text = (self.deploy / "docker" / "Dockerfile").read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        if not users or users[-1] in ("root", "0"):
            self.fail("docker/Dockerfile", "the image must run as a non-root USER")
        if not re.search(r"^HEALTHCHECK .*", text, re.M) or "/health" not in text:
            self.fail("docker/Dockerfile", "no HEALTHCHECK on /health")
        compose = yaml.safe_load((self.deploy / "docker-compose.yaml").read_text())
        services = set(compose.get("services", {}))
        for needed in ("router", "prefill", "decode", "prometheus", "grafana"):
            if needed not in services:
                self.fail("docker-compose.yaml", f"no {needed} service")
        self.compose_scrape(compose)

    def compose_scrape(self, compose: dict) -> None:
        """Each target is a service; where the router's /metrics asks for a key, every job
        scraping it sends that key, from the compose secret the router reads it from."""
        services = compose.get("services", {})
        router = services.get("router", {})
        cmd = router.get("command", [])
        cmd = cmd.split() if isinstance(cmd, str) else [str(a) for a in cmd]
        # /metrics asks for the admin key, or the API key where no admin key is set
        key_file = flag_value(cmd, "--admin-key-file") or flag_value(cmd, "--api-key-file")
        secret = secret_mounts(router).get(key_file) if key_file else None
        if key_file and secret is None:
            self.fail("docker-compose.yaml", f"router: {key_file} is no compose secret's path")
        if "--metrics-public" in cmd:
            secret = None
        prom_secrets = secret_mounts(services.get("prometheus", {}))
        where = "prometheus/prometheus.yml"
        for job in prometheus_jobs(self.deploy / "prometheus" / "prometheus.yml"):
            name = job.get("job_name")
            targets = [t for s in job.get("static_configs", []) for t in s.get("targets", [])]
            for target in targets:
                if target.split(":")[0] not in services:
                    self.fail(where, f"target {target} is no service")
            if secret is None or not any(t.split(":")[0] == "router" for t in targets):
                continue
            cred = job.get("authorization", {}).get("credentials_file")
            if cred is None:
                self.fail(
                    where,
                    f"job {name} sends no key (authorization: credentials_file), and the "
                    f"router's /metrics asks for the one in compose secret {secret}",
                )
            elif prom_secrets.get(cred) != secret:
                self.fail(
                    where,
                    f"job {name} reads its key from {cred}, where the prometheus service does "
                    f"not mount compose secret {secret}",
                )


K8S_SD_PROBE = {"kubernetes_sd_configs": [{"role": "endpoints"}]}
K8S_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}
K8S_SD_KEYS = {"role", "api_server", "kubeconfig_file", "namespaces", "selectors"}
K8S_SD_KEYS |= {"attach_metadata", "authorization", "basic_auth", "oauth2", "tls_config"}
K8S_SD_KEYS |= {"bearer_token", "bearer_token_file", "proxy_url", "no_proxy"}
K8S_SD_KEYS |= {"proxy_from_environment", "proxy_connect_header", "follow_redirects"}
K8S_SD_KEYS |= {"enable_http2"}


def promtool_config_ok(config: dict, name: str = "config") -> tuple[bool, str]:
    """`promtool check config --syntax-only` on a config given as a dict."""
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(config, f)
    try:
        r = run([tool("promtool"), "check", "config", "--syntax-only", f.name])
    finally:
        os.unlink(f.name)
    return r.returncode == 0, (r.stdout + r.stderr).replace(f.name, name).strip()


def kubernetes_sd_problems(configs: object) -> list[str]:
    """What promtool would refuse in a job's kubernetes_sd_configs, for a promtool without it."""
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        return ["kubernetes_sd_configs is not a list of mappings"]
    problems = []
    for c in configs:
        if c.get("role") not in K8S_SD_ROLES:
            problems.append(f'unknown Kubernetes SD role "{c.get("role")}"')  # as promtool says
        for key in sorted(set(c) - K8S_SD_KEYS):
            problems.append(f"kubernetes_sd_configs: unknown field {key}")
        ns = c.get("namespaces", {})
        if not isinstance(ns, dict) or set(ns) - {"names", "own_namespace"}:
            problems.append("kubernetes_sd_configs: namespaces takes names and own_namespace")
    return problems


def prometheus_jobs(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text()).get("scrape_configs") or []


def selected_jobs(deploy: Path) -> set[str]:
    """The `job="..."` every alert and dashboard query selects on."""
    exprs = dashboard_queries(deploy / "grafana" / "dashboards")
    with contextlib.suppress(OSError, yaml.YAMLError, KeyError, TypeError):  # promtool names it
        alerts = yaml.safe_load((deploy / "prometheus" / "alerts.yml").read_text())
        exprs += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    return {job for expr in exprs for job in JOB.findall(expr)}


def flag_value(cmd: list[str], flag: str) -> str | None:
    """The value of `flag` in a command line (`--flag=V` or `--flag V`), or None."""
    for i, arg in enumerate(cmd):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def secret_mounts(service: dict) -> dict[str, str]:
    """Where a compose service finds each of its secrets: path -> secret name."""
    mounts = {}
    for s in service.get("secrets", []):
        source = s if isinstance(s, str) else s.get("source", "")
        target = source if isinstance(s, str) else s.get("target", source)
        mounts[target if target.startswith("/") else f"/run/secrets/{target}"] = source
    return mounts


def all_panels(dash: dict) -> list[dict]:
    """The dashboard's panels, with those inside collapsed rows."""
    panels = []
    for panel in dash.get("panels", []):
        panels.append(panel)
        panels += panel.get("panels", []) if panel.get("type") == "row" else []
    return panels


def dashboard_queries(folder: Path) -> list[str]:
    exprs = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(json.JSONDecodeError):  # Check.dashboards names that file
            for panel in all_panels(json.loads(path.read_text())):
                for target in panel.get("targets", []):
                    exprs.append(target.get("expr", ""))
    return exprs


def exported_families(page: str) -> dict[str, set[str]]:
    """Each metric family on a page (its # TYPE name, less _total) and the series names that
    query it; a counter's or histogram's _created gauge goes with its family."""
    families = {}
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            families[line.split()[2].removesuffix("_total")] = exported_series(line)
    return {
        name: series
        for name, series in families.items()
        if not any(name in other for o, other in families.items() if o != name)
    }


def exported_series(page: str) -> set[str]:
    """Every series name a Prometheus query may use, from a page's # TYPE lines."""
    names = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = {
                "counter": ["_total", "_created"],
                "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["", "_sum", "_count", "_created"],
            }.get(kind, [""])
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + s for s in suffixes)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served():
    """`baton serve` (colocated, default model, CPU) on a free port; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "baton.server.cli", "serve", "--mode", "colocated"]
    cmd += ["--port", str(port), "--device", "cpu", "--dtype", "float32", "--kv-cache-gib", "0.1"]
    env = {**os.environ, "BATON_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(url + "/health", timeout=2) as r,
                ):
                    if r.status == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"deploy-check: baton serve did not start:\n{log.read()}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def live_metrics_page() -> str:
    with served() as url:
        body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        for payload in (body, {**body, "temperature": -1}):  # one served, one refused (400)
            req = urllib.request.Request(
                url + "/v1/completions",
                data=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json"},
            )
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(req, timeout=120).read()
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            return r.read().decode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--deploy-dir", type=Path, default=HERE)
    p.add_argument(
        "--metrics-page",
        type=Path,
        default=None,
        help="a saved /metrics page instead of starting baton serve",
    )
    p.add_argument("--save-metrics-page", type=Path, default=None, help="keep the live page here")
    args = p.parse_args()
    check = Check(args.deploy_dir.resolve())
    check.yaml_lint()
    check.kubernetes()
    check.prometheus()
    check.containers()
    check.dashboards()
    page = args.metrics_page.read_text() if args.metrics_page else live_metrics_page()
    if args.save_metrics_page:
        args.save_metrics_page.write_text(page)
    check.metrics_page(page)
    for problem in check.problems:
        print(f"deploy-check: {problem}")
    if check.problems:
        print(f"deploy-check: {len(check.problems)} problem(s)")
        return 1
    print("deploy-check: all good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
