#!/usr/bin/env python3
"""Checks k8s/observability/ (run by scripts/validate-k8s.sh in `make test`):

- the Grafana dashboard against our schema of Grafana's dashboard model
  (grafana-dashboard.schema.json), unique panel ids, panels inside the 24-column grid and not
  overlapping;
- the PrometheusRule: its shape (groups, rules with alert, expr, severity and a summary, `for`
  as a duration), unique alert names;
- every PromQL expression in both parsed (promql_parser, the Python binding of GreptimeDB's
  Rust PromQL parser: no promtool binary is published on the package registries that CI can
  reach), and every gristmill_* metric it names one that the coordinator registers (names
  read from coordinator/src/; counters get `_total`, histograms `_bucket`, `_sum`, `_count`).
"""
import json
import pathlib
import re
import sys

import jsonschema
import promql_parser
import yaml

root = pathlib.Path(__file__).resolve().parent.parent
obs = root / "k8s" / "observability"
problems = []


def known_metrics():
    names = set()
    for src in (root / "coordinator" / "src").rglob("*.rs"):
        names.update(re.findall(r'"(gristmill_[a-z0-9_]+)"', src.read_text()))
    out = set()
    for n in names:
        out.update({n, n + "_total", n + "_bucket", n + "_sum", n + "_count"})
    return out


KNOWN = known_metrics()
# From kube-state-metrics, which kube-prometheus-stack runs.
OTHERS = {"kube_statefulset_status_replicas", "kube_statefulset_status_replicas_ready"}


def check_expr(where, expr):
    try:
        promql_parser.parse(expr)
    except Exception as e:  # the parser raises ValueError with the position
        problems.append(f"{where}: not PromQL: {e}\n    {expr}")
        return
    # Metric names: identifiers not followed by '(' (functions) nor inside a label matcher's
    # value; a name the coordinator does not export is a typo or a missing metric.
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for name in re.findall(r"\b((?:gristmill|kube)_[a-z0-9_]+)\b(?!\s*\()", stripped):
        if name not in KNOWN and name not in OTHERS:
            problems.append(f"{where}: metric {name} is not one the coordinator exports")


def load(path, parse, kind):
    """The parsed file, or None with the problem noted."""
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError is a ValueError
        problems.append(f"{path.name}: not {kind}: {e}")
        return None


def check_dashboard():
    path = obs / "grafana-dashboard.json"
    dash = load(path, json.loads, "JSON")
    if not isinstance(dash, dict):
        return 0
    schema = json.loads((obs / "grafana-dashboard.schema.json").read_text())
    for e in jsonschema.Draft202012Validator(schema).iter_errors(dash):
        problems.append(f"{path.name}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
    ids, cells = set(), {}
    for p in dash.get("panels", []):
        pid = p.get("id")
        if pid in ids:
            problems.append(f"{path.name}: panel id {pid} used twice")
        ids.add(pid)
        g = p.get("gridPos", {})
        if g.get("x", 0) + g.get("w", 0) > 24:
            problems.append(f"{path.name}: panel {p.get('title')!r} runs past the 24 columns")
        for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
            for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
                if (x, y) in cells:
                    problems.append(f"{path.name}: panels {cells[(x, y)]!r} and {p.get('title')!r} overlap at {x},{y}")
                    break
                cells[(x, y)] = p.get("title")
        for t in p.get("targets", []):
            check_expr(f"{path.name}: panel {p.get('title')!r} query {t.get('refId')}", t.get("expr", ""))
    return len(dash.get("panels", []))


def check_rules():
    path = obs / "prometheus-rules.yaml"
    doc = load(path, yaml.safe_load, "YAML")
    if not isinstance(doc, dict):
        if doc is not None:
            problems.append(f"{path.name}: not a YAML mapping")
        return 0
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PrometheusRule":
        problems.append(f"{path.name}: not a monitoring.coreos.com/v1 PrometheusRule")
    names, count = set(), 0
    for g in doc.get("spec", {}).get("groups", []):
        if not g.get("name") or not g.get("rules"):
            problems.append(f"{path.name}: a group without a name or rules")
        for r in g.get("rules", []):
            count += 1
            name = r.get("alert") or r.get("record")
            where = f"{path.name}: {name or '(unnamed rule)'}"
            if not name:
                problems.append(f"{where}: a rule needs `alert` or `record`")
            if r.get("alert"):
                if name in names:
                    problems.append(f"{where}: alert name used twice")
                names.add(name)
                if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    problems.append(f"{where}: labels.severity must be critical, warning or info")
                if not r.get("annotations", {}).get("summary"):
                    problems.append(f"{where}: annotations.summary is missing")
            if "for" in r and not re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", str(r["for"])):
                problems.append(f"{where}: `for: {r['for']}` is not a duration")
            extra = set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            if extra:
                problems.append(f"{where}: unknown fields {sorted(extra)}")
            check_expr(where, str(r.get("expr", "")))
    return count


panels = check_dashboard()
rules = check_rules()
if problems:
    print("k8s/observability: " + str(len(problems)) + " problems", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    sys.exit(1)
print(f"k8s/observability: dashboard with {panels} panels and {rules} alerting rules valid")
