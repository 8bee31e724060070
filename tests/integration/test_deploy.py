"""The files in deploy/ held to the real service: every SQL query of the Grafana dashboard
runs on a PostgreSQL that holds events made through the HTTP API and returns the columns
its panel shows; every metric that a PromQL expression (dashboard or alert rule) names is
in a real /metrics scrape; the dashboard JSON is well-formed.

Grafana expands a query before it reaches PostgreSQL; `grafana_sql` does what Grafana's
PostgreSQL data source does, for the variables and macros the dashboard uses and no other
(a `$` left after expansion fails the test, so a new macro needs a line here first):

- `${company:sqlstring}`: the value in single quotes, each `'` doubled (Grafana's
  `sqlstring` format); `$company` and `${company}`: the bare value (Grafana's default for a
  single-valued variable on an SQL data source, so a query must quote it itself);
- `$__timeFilter(expr)`: `expr BETWEEN '<from>' AND '<to>'` with RFC 3339 UTC instants;
- `$__timeFrom()`, `$__timeTo()`: those instants, quoted.

The time range is the last 30 days to an hour ahead: the widest that a panel asks for.
The alert rules' own behaviour is checked by `promtool test rules` (deploy/check).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.app import RUNNER
from tests.e2e.oauth_helpers import basic, cc_token, new_app

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tollgate.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"

PROMETHEUS = "prometheus"
POSTGRES = "grafana-postgresql-datasource"
DATASOURCE_UIDS = {PROMETHEUS: "${DS_PROMETHEUS}", POSTGRES: "${DS_POSTGRES}"}

#: the columns each SQL panel shows, in order (a new SQL panel declares its own here)
PANEL_COLUMNS = {
    "Projection checkpoints": ["projection", "position", "events_behind", "updated_at"],
    "Violation emails waiting": ["waiting"],
    "Events per day by type": ["time", "metric", "events"],
    "IP violations per hour": ["time", "metric", "violations"],
    "Live tokens per application": ["application", "client_id", "live_tokens"],
    "Latest IP violations": ["time", "application", "client_id", "ip", "endpoint", "token_revoked"],
    "Latest admin changes": ["time", "change", "actor", "client_ip", "request_id", "details"],
}
#: labels that Prometheus adds to every scraped series (the service exposes none of them)
TARGET_LABELS = {"job", "instance"}

METRIC = re.compile(r"\btollgate_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(tollgate_[a-z0-9_]+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)\b(?!\()")
TIME_FILTER = re.compile(r"\$__timeFilter\(([^()]*(?:\([^()]*\))?[^()]*)\)")


# --- reading the files ------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any], kind: str) -> Iterator[tuple[str, str]]:
    """(where, query text) for every panel target and variable on data sources of `kind`."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            source = target.get("datasource") or panel["datasource"]
            if source["type"] == kind:
                yield panel["title"], target["rawSql" if kind == POSTGRES else "expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query" and variable["datasource"]["type"] == kind:
            query = variable["query"]
            yield f"${variable['name']}", query["query"] if isinstance(query, dict) else query


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# --- Grafana's expansion (see the module docstring) --------------------------------------


def grafana_sql(sql: str, variables: dict[str, str], start: datetime, end: datetime) -> str:
    def instant(moment: datetime) -> str:
        return "'" + moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") + "'"

    sql = TIME_FILTER.sub(lambda m: f"{m[1]} BETWEEN {instant(start)} AND {instant(end)}", sql)
    sql = sql.replace("$__timeFrom()", instant(start)).replace("$__timeTo()", instant(end))

    def variable(m: re.Match[str]) -> str:
        name, fmt = (m[1], m[2]) if m[1] else (m[3], None)
        value = variables[name]
        if fmt == "sqlstring":
            return "'" + value.replace("'", "''") + "'"
        assert fmt is None, f"format {fmt!r} is not expanded by this test"
        return value

    sql = VARIABLE.sub(variable, sql)
    assert "$" not in sql, f"a variable or macro this test does not expand is left: {sql}"
    return sql


def test_grafana_sql_expands_as_grafana_does():
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = start + timedelta(hours=1)
    sql = (
        "SELECT 1 FROM t WHERE c = ${company:sqlstring} AND d = '$company' "
        "AND e = '${company}' AND $__timeFilter(date_trunc('hour', at)) AND f > $__timeFrom()"
    )
    assert grafana_sql(sql, {"company": "o'neil"}, start, end) == (
        "SELECT 1 FROM t WHERE c = 'o''neil' AND d = 'o'neil' AND e = 'o'neil' "
        "AND date_trunc('hour', at) BETWEEN '2026-01-02T03:04:05Z' AND '2026-01-02T04:04:05Z' "
        "AND f > '2026-01-02T03:04:05Z'"
    )
    with pytest.raises(AssertionError, match="does not expand"):
        grafana_sql("SELECT $__timeGroup(at, '1h')", {}, start, end)


# --- the dashboard's shape ----------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_model():
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert board["title"] and board["uid"]
    assert board["id"] is None  # an import creates it; a fixed id would overwrite another
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == PROMETHEUS
    assert variables["DS_POSTGRES"]["type"] == "datasource"
    assert variables["DS_POSTGRES"]["query"] == POSTGRES
    assert variables["company"]["datasource"] == {"type": POSTGRES, "uid": "${DS_POSTGRES}"}
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_title_and_a_datasource_variable():
    board = dashboard()
    for panel in panels(board):
        assert panel.get("title"), panel
        if panel["type"] == "row":  # a row only groups the panels below it
            assert not panel.get("targets"), panel["title"]
            continue
        source = panel.get("datasource")
        assert source is not None, f"{panel['title']}: no datasource"
        assert source["uid"] == DATASOURCE_UIDS[source["type"]], panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_covers_the_metrics_and_views_ops_asked_for():
    board = dashboard()
    promql = " ".join(expr for _where, expr in queries(board, PROMETHEUS))
    for name in (
        "tollgate_http_requests_total",
        "tollgate_http_request_duration_seconds_bucket",
        "tollgate_tokens_issued_total",
        "tollgate_token_revocations_total",
        "tollgate_ip_violations_total",
        "tollgate_emails_sent_total",
        "tollgate_emails_failed_total",
        "tollgate_projection_lag_events",
        "tollgate_projection_lag_seconds",
        "tollgate_database_up",
        "tollgate_notification_queue_usage",
        "tollgate_model_snapshot_events_behind",
        "tollgate_eventlog_append_batch_size_bucket",
        "tollgate_projection_events_total",
    ):
        assert name in promql, name
    sql = " ".join(query for _where, query in queries(board, POSTGRES))
    for view in ("v_ip_violations", "v_live_tokens_per_application", "v_admin_changes"):
        assert view in sql, view
    sql_panels = {where for where, _query in queries(board, POSTGRES) if not where.startswith("$")}
    assert sql_panels == set(PANEL_COLUMNS)


# --- the SQL against real events ----------------------------------------------------------


async def projections_caught_up(client, db) -> None:
    names = list(client.app[RUNNER].projections)
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        # The head and the checkpoints from one snapshot: read one after the other, the
        # checkpoints could be compared with a head that had moved on meanwhile.
        rows = await db.pool.fetch(
            "SELECT name, position, (SELECT coalesce(max(position), 0) FROM events) AS head "
            "FROM projection_checkpoints WHERE name = any($1)",
            names,
        )
        if len(rows) == len(names) and all(r["position"] >= r["head"] for r in rows):
            return
        assert asyncio.get_running_loop().time() < deadline, "projections never caught up"
        await asyncio.sleep(0.05)


async def some_history(client, company) -> dict[str, Any]:
    """An application with a live token, and one whose credentials were used from a
    disallowed address (a violation at the token endpoint), all through the HTTP API."""
    allowed = await new_app(client, company, name="Billing sync", ip_allowlist=["127.0.0.1"])
    await cc_token(client, allowed)
    fenced = await new_app(client, company, name="Fenced", ip_allowlist=["192.0.2.0/24"])
    response = await client.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        headers=basic(fenced["client_id"], fenced["client_secret"]),
    )
    assert response.status == 403
    assert (await response.json())["error"] == "ip_not_allowed"
    return {"allowed": allowed, "fenced": fenced}


async def run_sql_panels(client, db, company) -> dict[str, list[dict[str, Any]]]:
    now = datetime.now(UTC)
    start, end = now - timedelta(days=30), now + timedelta(hours=1)
    results: dict[str, list[dict[str, Any]]] = {}
    async with db.pool.acquire() as conn:
        for where, query in queries(dashboard(), POSTGRES):
            sql = grafana_sql(query, {"company": company.company_id}, start, end)
            statement = await conn.prepare(sql)
            columns = [a.name for a in statement.get_attributes()]
            if where in PANEL_COLUMNS:
                assert columns == PANEL_COLUMNS[where], where
            results[where] = [dict(r) for r in await statement.fetch()]
    return results


async def test_every_sql_panel_runs_on_real_events_and_shows_them(client, db, company):
    made = await some_history(client, company)
    names = list(client.app[RUNNER].projections)
    for _ in range(50):
        # Events that follow the request (the violation email's outcome, written by its
        # worker) can land between the catch-up and the panels: then read them again.
        await projections_caught_up(client, db)
        results = await run_sql_panels(client, db, company)
        behind = {r["projection"]: r["events_behind"] for r in results["Projection checkpoints"]}
        if all(behind[name] == 0 for name in names):
            break

    assert {"__value": company.company_id, "__text": "Acme"} in results["$company"]
    [hour] = results["IP violations per hour"]
    assert hour["metric"] == "token"
    assert hour["violations"] == 1
    assert hour["time"] <= datetime.now(UTC)
    live = {r["client_id"]: r for r in results["Live tokens per application"]}
    assert live[made["allowed"]["client_id"]]["live_tokens"] == 1
    assert live[made["allowed"]["client_id"]]["application"] == "Billing sync"
    assert live[made["fenced"]["client_id"]]["live_tokens"] == 0
    [violation] = results["Latest IP violations"]
    assert violation["client_id"] == made["fenced"]["client_id"]
    assert violation["application"] == "Fenced"
    assert (violation["ip"], violation["endpoint"]) == ("127.0.0.1", "token")
    assert violation["token_revoked"] is False  # no token to revoke at the token endpoint
    changes = results["Latest admin changes"]
    created = [c for c in changes if c["change"] == "ApplicationCreated"]
    assert len(created) == 2
    assert all(c["request_id"] and c["actor"] for c in created)
    assert made["fenced"]["client_secret"] not in json.dumps(changes, default=str)
    assert results["Violation emails waiting"][0]["waiting"] in (0, 1)  # the notifier runs
    assert all(behind[name] == 0 for name in names), behind
    per_day = {r["metric"]: r["events"] for r in results["Events per day by type"]}
    assert per_day["IpViolationDetected"] == 1
    assert per_day["AccessTokenIssued"] == 1


async def test_time_series_panels_return_what_grafana_can_plot(client, db, company):
    await some_history(client, company)
    await projections_caught_up(client, db)
    results = await run_sql_panels(client, db, company)
    board = dashboard()
    for panel in panels(board):
        for target in panel.get("targets", []):
            if target.get("format") != "time_series":
                continue
            rows = results[panel["title"]]
            assert rows, f"{panel['title']}: no rows to plot"
            for row in rows:
                assert isinstance(row["time"], datetime), panel["title"]
                values = [v for k, v in row.items() if k not in ("time", "metric")]
                assert values and all(isinstance(v, int | float) for v in values), panel["title"]


async def test_the_queries_in_alert_runbooks_run(client, db, company):
    await some_history(client, company)
    descriptions = " ".join(r["annotations"]["description"] for r in alert_rules())
    snippets = re.findall(r"`(SELECT [^`]+)`", descriptions)
    assert len(snippets) >= 3
    for sql in snippets:
        await db.pool.fetch(sql)


# --- PromQL against a real scrape ---------------------------------------------------------


async def real_scrape(client, company) -> dict[str, set[str]]:
    """Metric sample name -> its label names, from /metrics after real traffic (a token,
    a violation, a 404) so that labelled series which appear on first use are there."""
    await some_history(client, company)
    assert (await client.get("/no/such/path")).status == 404
    assert (await client.get("/readyz")).status in (200, 503)
    response = await client.get("/metrics")
    assert response.status == 200
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def promql_sources() -> Iterator[tuple[str, str]]:
    """(where, expression) for every PromQL expression of the dashboard and the alerts."""
    yield from queries(dashboard(), PROMETHEUS)
    for rule in alert_rules():
        yield rule["alert"], rule["expr"]


async def test_every_metric_a_promql_expression_names_is_in_a_real_scrape(client, company):
    scraped = await real_scrape(client, company)
    expressions = list(promql_sources())
    assert len(expressions) > 20
    named = set()
    for where, expr in expressions:
        for metric in METRIC.findall(expr):
            named.add(metric)
            assert metric in scraped, f"{where}: {metric} is not in /metrics"
    # the alert tests feed promtool series under the names the service exposes
    for metric in METRIC.findall(ALERTS_TEST.read_text()):
        assert metric in scraped, f"alerts_test.yml: {metric} is not in /metrics"
    assert len(named) >= 10


async def test_every_label_a_promql_expression_uses_is_on_its_metric(client, company):
    scraped = await real_scrape(client, company)
    for where, expr in promql_sources():
        metrics = set(METRIC.findall(expr))
        for metric, matchers in SELECTOR.findall(expr):
            for label in MATCHER_LABEL.findall(matchers):
                if label not in TARGET_LABELS:
                    assert label in scraped.get(metric, set()), (
                        f"{where}: {metric} has no label {label}"
                    )
        known = set().union(*(scraped.get(m, set()) for m in metrics)) | TARGET_LABELS
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in grouping.split(","))):
                assert label in known, f"{where}: no metric of it has the label {label}"
