"""The compliance page (the Airflow plugin's FastAPI app) with FastAPI's TestClient.

The app is the one the plugin mounts, wired to Airflow's security: the simple auth manager
issues real JWTs (a viewer may read, a user may edit DAGs), and every route is checked
anonymous (401), authorized (200) and, for hold changes, without edit access (403). What the
pages show is checked against an audit database seeded by real runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from retention.evidence.audit import ensure_schema
from retention.evidence.chain import read_certificates
from retention.evidence.checkpoints import CHECKPOINTS_ENV
from retention.evidence.signing import PublicKeys
from retention.evidence.verify import verify_chain
from retention.holds import HoldRegistry
from retention.interfaces.cli import main

from conftest import connect, write_rule
from sqlpurge import insert_customers, make_customers

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
UTC = timezone.utc
NIGHTS = 3

READS = ["/", "/?category=customer_accounts&status=complete", "/certificates/1", "/certificates/1/payload",
         "/verify", "/verify?run=true", "/status", "/holds", "/schedule",
         "/report?since=2023-01-01&until=2023-06-01", "/report?since=2023-01-01&until=2023-06-01&format=csv"]
CHANGES = [("/holds", {"category": "customer_accounts", "case_id": "CASE-9", "reason": "dispute"}),
           ("/holds/1/release", {"reason": "settled"})]


@pytest.fixture(scope="session")
def airflow_db():
    """The Airflow metadata database (SQLite in the test AIRFLOW_HOME): tokens and DAG teams are read there."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env=os.environ.copy())


@pytest.fixture
def seeded(audit_db, sqlite_db, keys, tmp_path, monkeypatch):
    """Three nights of real runs of customer_accounts (one hold honoured), a second category never run,
    checkpoints beside them; the environment the plugin reads set as an API server would have it."""
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=30 * i))
                                 for i in range(1, 41)])
    rules = tmp_path / "rules"
    write_rule(rules)
    write_rule(rules, "support_tickets", targets=[{"name": "tickets", "table": "tickets"}])
    sqlite_db.execute("CREATE TABLE tickets (id INTEGER PRIMARY KEY, closed_at TIMESTAMP)")
    registry = HoldRegistry(_audit())
    registry.add(category="customer_accounts", match={"email": "person3@example.com"}, case_id="CASE-1",
                 reason="chargeback", by="legal@example.com")
    for night in range(NIGHTS):
        assert main(["run", "--rules", str(rules), "--category", "customer_accounts",
                     "--as-of", f"2023-0{night + 1}-01T03:00:00Z", "--run-id", f"night-{night + 1}"]) == 0
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rules))
    monkeypatch.setenv("RETENTION_PUBLIC_KEYS", str(keys[1]))
    monkeypatch.delenv("RETENTION_KEYRING", raising=False)
    return audit_db


@pytest.fixture
def tokens(airflow_db, tmp_path, monkeypatch):
    """JWTs the simple auth manager signs: a viewer (reads) and an editor (role user: edits DAGs)."""
    from airflow.api_fastapi.app import init_auth_manager, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    monkeypatch.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                       "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "viewer:viewer,editor:user")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(tmp_path / "passwords.json"))
    purge_cached_app()
    manager = init_auth_manager()
    yield {name: manager.generate_jwt(SimpleAuthManagerUser(username=name, role=role))
           for name, role in (("viewer", "viewer"), ("editor", "user"))}
    purge_cached_app()


@pytest.fixture
def client(seeded, tokens):
    from fastapi.testclient import TestClient

    from retention.interfaces.airflow_plugin import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- who may do what ---------------------------------------------------------------------


@pytest.mark.parametrize("path", READS)
def test_every_page_refuses_an_anonymous_request(client, path):
    answer = client.get(path)

    assert answer.status_code == 401
    assert "/auth/login" in answer.text  # the page says where to sign in


@pytest.mark.parametrize("path, form", CHANGES)
def test_hold_changes_refuse_an_anonymous_request(client, path, form):
    answer = client.post(path, data=form)

    assert answer.status_code == 401
    assert len(HoldRegistry(_audit()).find()) == 1 and HoldRegistry(_audit()).get(1).released_at is None


@pytest.mark.parametrize("path", READS)
def test_every_page_answers_a_signed_in_viewer(client, tokens, path):
    answer = client.get(path, headers=bearer(tokens["viewer"]))

    assert answer.status_code == 200, answer.text[:500]


@pytest.mark.parametrize("path", READS[:3])
def test_the_airflow_ui_session_cookie_is_enough(client, tokens, path):
    client.cookies.set("_token", tokens["viewer"])

    assert client.get(path).status_code == 200


def test_a_forged_token_is_refused(client, tokens):
    header, payload, _signature = tokens["editor"].split(".")

    assert client.get("/", headers=bearer(f"{header}.{payload}.AAAA")).status_code == 403


@pytest.mark.parametrize("path, form", CHANGES)
def test_a_viewer_may_not_change_holds(client, tokens, path, form):
    before = HoldRegistry(_audit()).find(include_released=True)

    answer = client.post(path, data=form, headers=bearer(tokens["viewer"]))

    assert answer.status_code == 403
    assert "retention__customer_accounts" in answer.text
    assert HoldRegistry(_audit()).find(include_released=True) == before


def test_an_editor_places_and_releases_a_hold(client, tokens):
    placed = client.post("/holds", headers=bearer(tokens["editor"]), data={
        "category": "customer_accounts", "target": "customers", "case_id": "CASE-77", "reason": "subpoena",
        "match": '{"email": "person9@example.com"}', "until": "2099-12-31"})

    assert placed.status_code == 200 and placed.history[0].status_code == 303
    registry = HoldRegistry(_audit())
    hold = registry.find()[-1]
    assert (hold.case_id, hold.target, hold.match, hold.placed_by, str(hold.until)) == (
        "CASE-77", "customers", {"email": "person9@example.com"}, "editor", "2099-12-31")
    assert f"Placed hold #{hold.id}" in placed.text

    released = client.post(f"/holds/{hold.id}/release", data={"reason": "withdrawn"}, headers=bearer(tokens["editor"]))

    assert released.status_code == 200
    hold = registry.get(hold.id)
    assert (hold.released_by, hold.release_reason) == ("editor", "withdrawn")
    assert [e["event"] for e in registry.history(hold.id)] == ["placed", "released"]


def test_a_hold_the_cli_would_refuse_is_refused_with_its_reason(client, tokens):
    answer = client.post("/holds", headers=bearer(tokens["editor"]), data={
        "category": "customer_accounts", "target": "custmers", "case_id": "C", "reason": "r"})

    assert answer.status_code == 400
    assert "did you mean &#39;customers&#39;?" in answer.text
    assert len(HoldRegistry(_audit()).find()) == 1


def test_a_form_posted_from_another_site_is_refused(client, tokens):
    answer = client.post("/holds/1/release", data={"reason": "x"},
                         headers={**bearer(tokens["editor"]), "Origin": "https://evil.example"})

    assert answer.status_code == 403
    assert HoldRegistry(_audit()).get(1).released_at is None


# -- what the pages show -----------------------------------------------------------------


def _audit():
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit

    return open_audit(from_environment)


def test_the_list_shows_the_certificates_of_the_audit_database(client, tokens):
    stored = list(read_certificates(_audit()))
    assert len(stored) == NIGHTS

    page = client.get("/", headers=bearer(tokens["viewer"])).text

    for certificate in stored:
        assert f'data-seq="{certificate.seq}"' in page
        assert certificate.run_id in page and certificate.entry_hash[:12] in page
    assert page.index('data-seq="3"') < page.index('data-seq="1"')  # newest first


def test_the_list_filters_by_category_status_and_period(client, tokens):
    viewer = bearer(tokens["viewer"])
    issued = [c.issued_at.date() for c in read_certificates(_audit())]

    assert 'data-seq=' not in client.get("/?category=support_tickets", headers=viewer).text
    assert 'data-seq=' not in client.get("/?status=failed", headers=viewer).text
    assert client.get("/?status=complete", headers=viewer).text.count('data-seq=') == NIGHTS
    day = issued[0]
    assert client.get(f"/?since={day}&until={day}", headers=viewer).text.count('data-seq=') == NIGHTS
    before = day - timedelta(days=1)
    assert 'data-seq=' not in client.get(f"/?until={before}", headers=viewer).text
    assert client.get("/?since=yesterday", headers=viewer).status_code == 400


def test_one_certificate_in_full(client, tokens):
    certificate = next(read_certificates(_audit(), seq=1))
    data = certificate.data
    [target] = data["targets"]

    page = client.get("/certificates/1", headers=bearer(tokens["viewer"])).text

    assert certificate.run_id in page and data["issued_by"] in page and certificate.key_id in page
    assert f'<td class="n">{target["matched"]:,}</td><td class="n">{target["deleted"]:,}</td>' in page
    assert data["holds"] == [1] and "#1" in page and "CASE-1" in page
    assert data["rule"]["sha256"] in page
    assert client.get("/certificates/99", headers=bearer(tokens["viewer"])).status_code == 404


def test_the_raw_payload_is_the_signed_bytes(client, tokens, keys):
    certificate = next(read_certificates(_audit(), seq=2))

    answer = client.get("/certificates/2/payload", headers=bearer(tokens["viewer"]))

    assert answer.content == certificate.payload.encode("utf-8")
    PublicKeys.from_pem_files([keys[1]]).verify(answer.headers["X-Retention-Key-Id"],
                                                answer.headers["X-Retention-Signature"], answer.content, seq=2)


def test_verify_now_reports_the_chain_and_its_head(client, tokens, keys):
    head = verify_chain(_audit(), PublicKeys.from_pem_files([keys[1]]))

    page = client.get("/verify?run=true", headers=bearer(tokens["viewer"])).text

    assert f"✓ {NIGHTS} certificates verified" in page
    assert f"seq {head.head_seq} <code>{head.head_hash}</code>" in page
    assert f"the newest, seq {NIGHTS}" in page  # the checkpoints runs wrote were checked
    assert 'id="result"' not in client.get("/verify", headers=bearer(tokens["viewer"])).text  # only on the button


def test_verify_now_fails_when_the_checkpoints_are_gone(client, tokens, tmp_path):
    for note in (tmp_path / "checkpoints").iterdir():
        note.unlink()

    page = client.get("/verify?run=true", headers=bearer(tokens["viewer"])).text

    assert "✗" in page and "no checkpoints at" in page


def test_verify_without_trusted_keys_says_how_to_configure_them(client, tokens, monkeypatch):
    monkeypatch.delenv("RETENTION_PUBLIC_KEYS")

    page = client.get("/verify?run=true", headers=bearer(tokens["viewer"])).text

    assert "No trusted public keys are configured" in page and "RETENTION_KEYRING" in page


def test_status_puts_the_failing_targets_first(client, tokens):
    # Tonight's run brings customer_accounts up to date; support_tickets has never run. (The row
    # hold is released first: the engine's status cannot count the rows a match hold protects yet.)
    HoldRegistry(_audit()).release(1, reason="settled", by="legal")
    assert main(["run", "--rules", os.environ["RETENTION_RULES_DIR"], "--category", "customer_accounts",
                 "--run-id", "tonight"]) == 0

    page = client.get("/status", headers=bearer(tokens["viewer"])).text

    never_run, healthy = page.index("support_tickets"), page.index("<td>customer_accounts</td>")
    assert never_run < healthy
    assert "never run" in page and '<span class="badge ok">ok</span>' in page


def test_holds_in_force_and_history(client, tokens):
    registry = HoldRegistry(_audit())
    released = registry.add(category="customer_accounts", case_id="CASE-2", reason="audit", by="legal")
    registry.release(released.id, reason="closed", by="legal")

    page = client.get("/holds", headers=bearer(tokens["viewer"])).text

    in_force, history = page.split('id="history"')
    assert 'data-hold="1"' in in_force and f'data-hold="{released.id}"' not in in_force
    assert "CASE-1" in history and "CASE-2" in history and "released" in history
    assert 'id="place-hold"' not in page  # a viewer is not offered the form
    assert 'id="place-hold"' in client.get("/holds", headers=bearer(tokens["editor"])).text


def test_the_schedule_and_the_period_report(client, tokens):
    viewer = bearer(tokens["viewer"])

    schedule = client.get("/schedule", headers=viewer).text
    report = client.get("/report?since=2020-01-01&until=2100-01-01", headers=viewer).text

    assert "customer_accounts" in schedule and "support_tickets" in schedule and "2 years" in schedule
    assert "/report?since=" in schedule
    assert "customer_accounts" in report and "CASE-1" in report
    head = verify_chain(_audit(), PublicKeys.from_pem_files([os.environ["RETENTION_PUBLIC_KEYS"]]))
    assert head.head_hash in report


# -- the plugin ---------------------------------------------------------------------------


def test_installing_the_package_registers_the_plugin():
    from airflow.plugins_manager import is_valid_plugin

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["airflow.plugins"]
    module, _, name = entry["retention"].partition(":")
    plugin = getattr(__import__(module, fromlist=[name]), name)

    assert is_valid_plugin(plugin)
    [app] = plugin.fastapi_apps
    assert app["url_prefix"] == "/retention"
    [view] = plugin.external_views
    assert view["destination"] == "nav" and not view["href"].startswith("/")


# -- attacks (hostile review) -------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/certificates/abc", "/certificates/abc/payload", "/certificates/99999999999999999999999",
    "/certificates/99999999999999999999999/payload", "/certificates/-1",
    "/?since=" + "9" * 20000,
    "/holds?placed=abc", "/verify?run=maybe", "/report?since=2023-06-01&until=2023-01-01",
    "/report?since=2023-01-01&until=2023-06-01&format=pdf"])
def test_malformed_or_huge_parameters_are_a_clear_4xx(client, tokens, path):
    answer = client.get(path, headers=bearer(tokens["viewer"]))

    assert 400 <= answer.status_code < 500, answer.text[:300]
    assert answer.headers["content-type"].startswith("text/html")
    assert "Traceback" not in answer.text and len(answer.text) < 10_000  # the input is not echoed whole
    assert '<p class="problem">' in answer.text


@pytest.mark.parametrize("query", ["until=9999-12-31", "since=0001-01-01&until=9999-12-31"])
def test_the_edges_of_the_calendar_are_valid_filters(client, tokens, query):
    answer = client.get(f"/?{query}", headers=bearer(tokens["viewer"]))

    assert answer.status_code == 200 and answer.text.count("data-seq=") == NIGHTS


def test_a_release_of_a_huge_or_malformed_hold_id_is_a_clear_4xx(client, tokens):
    for hold_id in ("99999999999999999999999", "x"):
        answer = client.post(f"/holds/{hold_id}/release", data={"reason": "x"}, headers=bearer(tokens["editor"]))

        assert 400 <= answer.status_code < 500 and '<p class="problem">' in answer.text
    assert HoldRegistry(_audit()).get(1).released_at is None


@pytest.mark.parametrize("headers", [{}, {"Origin": "null"}, {"Referer": "https://evil.example/form"},
                                     {"Origin": "https://testserver.evil.example"}])
def test_a_cookie_signed_form_without_a_same_origin_proof_is_refused(client, tokens, headers):
    # A browser adds the session cookie by itself; only Origin (or Referer) shows the form was ours.
    client.cookies.set("_token", tokens["editor"])

    answer = client.post("/holds/1/release", data={"reason": "x"}, headers=headers)

    assert answer.status_code == 403, answer.text[:300]
    assert HoldRegistry(_audit()).get(1).released_at is None


@pytest.mark.parametrize("headers", [{"Origin": "http://testserver"}, {"Referer": "http://testserver/holds"}])
def test_a_cookie_signed_form_from_the_page_itself_is_accepted(client, tokens, headers):
    client.cookies.set("_token", tokens["editor"])

    answer = client.post("/holds/1/release", data={"reason": "settled"}, headers=headers, follow_redirects=False)

    assert answer.status_code == 303
    assert HoldRegistry(_audit()).get(1).released_by == "editor"


@pytest.mark.parametrize("path", ["/", "/certificates/1", "/certificates/1/payload", "/holds", "/nowhere"])
def test_every_answer_forbids_sniffing_framing_by_others_scripts_and_caching(client, tokens, path):
    answer = client.get(path, headers=bearer(tokens["viewer"]))

    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "SAMEORIGIN"  # the Airflow UI frames it from its own origin
    policy = answer.headers["content-security-policy"]
    assert "script-src 'none'" in policy and "frame-ancestors 'self'" in policy and "form-action 'self'" in policy
    assert answer.headers["cache-control"] == "no-store"  # hold scopes name people


XSS = '"><script>alert(1)</script>'


def test_what_an_engineer_or_attacker_typed_is_shown_escaped(client, tokens):
    registry = HoldRegistry(_audit())
    registry.add(category="customer_accounts", match={"email": XSS}, case_id=XSS, reason=XSS, by=XSS)
    viewer = bearer(tokens["viewer"])

    pages = [client.get("/holds", headers=viewer), client.get(f"/?since={XSS}", headers=viewer),
             client.get(f"/report?since={XSS}&until=2023-01-01", headers=viewer),
             client.get(f"/nowhere{XSS}", headers=viewer)]

    for page in pages:
        assert "<script>" not in page.text
    assert "&lt;script&gt;" in pages[0].text and "&lt;script&gt;" in pages[1].text


@pytest.mark.parametrize("category", ["../x", "a' OR 1=1 --", "customer_accounts' --", "nosuch"])
def test_a_hold_on_a_category_that_does_not_exist_is_refused(client, tokens, category):
    answer = client.post("/holds", data={"category": category, "case_id": "C", "reason": "r"},
                         headers=bearer(tokens["editor"]))

    assert answer.status_code == 400 and "no category" in answer.text
    assert len(HoldRegistry(_audit()).find(include_released=True)) == 1


def test_a_viewer_may_not_place_a_hold_on_a_crafted_category(client, tokens):
    answer = client.post("/holds", data={"category": "../x", "case_id": "C", "reason": "r"},
                         headers=bearer(tokens["viewer"]))

    assert answer.status_code == 403
    assert len(HoldRegistry(_audit()).find(include_released=True)) == 1


def test_a_signed_in_user_without_a_role_reads_nothing(client, tokens):
    # Another auth manager's user with no roles is authenticated, but Airflow shows it nothing: nor do we.
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    nobody = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="nobody", role=None))

    for path in READS:
        answer = client.get(path, headers=bearer(nobody))
        assert answer.status_code == 403, path
        assert "CASE-1" not in answer.text and "night-1" not in answer.text


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/", "/certificates/1/payload", "/holds", "/holds/1/release"])
def test_other_methods_show_nothing_to_an_anonymous_request(client, method, path):
    answer = client.request(method, path)

    assert answer.status_code in (401, 405)
    assert "night-1" not in answer.text and "CASE-1" not in answer.text


@pytest.mark.parametrize("path", ["/holds/", "/certificates/1/", "/status/", "//evil.example/", "/static/x.css",
                                  "/docs", "/openapi.json"])
def test_odd_paths_show_nothing_to_an_anonymous_request_nor_redirect_away(client, path):
    answer = client.get(path, follow_redirects=False)

    assert answer.status_code in (401, 404, 307), answer.status_code
    if answer.status_code == 307:
        assert urlsplit_host(answer.headers["location"]) in ("", "testserver")
    assert "night-1" not in answer.text and "CASE-1" not in answer.text


def urlsplit_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


# -- a careless operator ------------------------------------------------------------------


def test_no_audit_connection_configured_is_a_clear_503(client, tokens, monkeypatch):
    monkeypatch.setenv("RETENTION_AUDIT_CONN", "retention_audit_typo")
    from fastapi.testclient import TestClient

    from retention.interfaces.airflow_plugin import create_app

    with TestClient(create_app()) as fresh:
        answer = fresh.get("/", headers=bearer(tokens["viewer"]))

    assert answer.status_code == 503 and "retention_audit_typo" in answer.text and "is not defined" in answer.text


def test_an_unreachable_audit_database_is_a_clear_503_without_its_password(tokens, seeded, monkeypatch):
    from fastapi.testclient import TestClient

    from retention.interfaces.airflow_plugin import create_app

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", "postgresql://auditor:s3cr3t-pw@127.0.0.1:1/audit")
    with TestClient(create_app()) as fresh:
        for path in ("/", "/holds", "/verify?run=true", "/certificates/1"):
            answer = fresh.get(path, headers=bearer(tokens["viewer"]))

            assert answer.status_code == 503, (path, answer.text[:300])
            assert "connection retention_audit failed" in answer.text and "s3cr3t-pw" not in answer.text


def test_an_empty_chain_shows_empty_pages(tokens, audit_db, keys, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from retention.interfaces.airflow_plugin import create_app

    rules = tmp_path / "rules"
    write_rule(rules)
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rules))
    monkeypatch.setenv("RETENTION_PUBLIC_KEYS", str(keys[1]))
    monkeypatch.delenv(CHECKPOINTS_ENV, raising=False)
    viewer = bearer(tokens["viewer"])
    ensure_schema(audit_db.engine)  # a deployment's init step: the audit tables, no run yet
    with TestClient(create_app()) as fresh:
        assert "never run" in fresh.get("/status", headers=viewer).text
        assert "No certificates match" in fresh.get("/", headers=viewer).text
        assert "No certificates to verify yet" in fresh.get("/verify?run=true", headers=viewer).text
        assert "No holds in force" in fresh.get("/holds", headers=viewer).text
        assert fresh.get("/certificates/1", headers=viewer).status_code == 404


@pytest.mark.parametrize("path", ["/status", "/", "/holds", "/verify?run=true"])
def test_a_database_without_audit_tables_is_a_clear_503_and_nothing_is_created(tokens, audit_db, keys, tmp_path,
                                                                               monkeypatch, path):
    # Pointed at the wrong database, the status page created the ten audit tables there (as
    # `retention status` did) and showed every target "never run".
    from fastapi.testclient import TestClient

    from retention.interfaces.airflow_plugin import create_app

    rules = tmp_path / "rules"
    write_rule(rules)
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rules))
    monkeypatch.setenv("RETENTION_PUBLIC_KEYS", str(keys[1]))
    monkeypatch.delenv(CHECKPOINTS_ENV, raising=False)
    with TestClient(create_app()) as fresh:
        answer = fresh.get(path, headers=bearer(tokens["viewer"]))

    assert answer.status_code == 503, answer.text[:300]
    assert "retention_audit" in answer.text and "no audit tables" in answer.text
    assert sa.inspect(audit_db.engine).get_table_names() == []


def test_no_keys_configured_is_a_clear_message_on_every_page_that_needs_them(client, tokens, monkeypatch):
    monkeypatch.delenv("RETENTION_PUBLIC_KEYS")

    report = client.get("/report?since=2023-01-01&until=2023-06-01", headers=bearer(tokens["viewer"]))

    assert report.status_code == 200


@pytest.mark.parametrize("where", ["file", "s3"])
def test_an_unreachable_checkpoint_store_is_a_clear_failure(client, tokens, tmp_path, monkeypatch, where):
    if where == "file":
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        monkeypatch.setenv(CHECKPOINTS_ENV, str(blocker / "checkpoints"))
    else:
        monkeypatch.setenv(CHECKPOINTS_ENV, "s3://no-such-bucket/checkpoints")
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT",
                           "aws://AKIAEXAMPLE:s3cr3t-key@/?endpoint_url=http%3A%2F%2F127.0.0.1%3A1&region_name=us-east-1")

    answer = client.get("/verify?run=true", headers=bearer(tokens["viewer"]))

    assert answer.status_code in (200, 503), answer.text[:300]
    assert "✗" in answer.text or "checkpoint" in answer.text
    assert "s3cr3t-key" not in answer.text and "Traceback" not in answer.text


def test_a_broken_rule_file_is_a_clear_503_and_the_certificates_still_list(client, tokens):
    rules = Path(os.environ["RETENTION_RULES_DIR"])
    (rules / "broken.yaml").write_text("category: [unclosed\n")
    viewer = bearer(tokens["viewer"])

    for path in ("/holds", "/status", "/schedule"):
        answer = client.get(path, headers=viewer)
        assert answer.status_code == 503 and "broken.yaml" in answer.text, (path, answer.text[:300])
    assert client.get("/", headers=viewer).status_code == 200


def _plant(statement: str, params: dict) -> None:
    """What someone with write access to the audit database can do: drop the append-only triggers, edit a row."""
    import sqlalchemy as sa

    with _audit().begin() as conn:
        for (name,) in conn.execute(sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).all():
            conn.execute(sa.text(f'DROP TRIGGER "{name}"'))
        conn.execute(sa.text(statement), params)


@pytest.mark.parametrize("signature, key_id", [("abc\r\nX-Evil: 1", "k1"), ("c2ln", "k\u20ac"),
                                               ("c2ln", "k\nSet-Cookie: _token=x")])
def test_a_planted_signature_or_key_id_does_not_break_or_inject_headers(client, tokens, signature, key_id):
    _plant("UPDATE purge_certificates SET signature = :s, key_id = :k WHERE seq = 2", {"s": signature, "k": key_id})
    stored = next(read_certificates(_audit(), seq=2))

    answer = client.get("/certificates/2/payload", headers=bearer(tokens["viewer"]))

    assert answer.status_code == 200 and answer.content == stored.payload.encode("utf-8")
    assert "x-evil" not in answer.headers and "set-cookie" not in answer.headers
    assert all("\n" not in value and "\r" not in value for value in answer.headers.values())
    assert client.get("/certificates/2", headers=bearer(tokens["viewer"])).status_code == 200


def test_a_case_id_longer_than_the_audit_database_keeps_is_refused(client, tokens):
    answer = client.post("/holds", data={"category": "customer_accounts", "case_id": "C" * 101, "reason": "r"},
                         headers=bearer(tokens["editor"]))

    assert answer.status_code == 400 and "case id" in answer.text and "100" in answer.text
    assert len(HoldRegistry(_audit()).find(include_released=True)) == 1


def test_a_database_error_is_one_line_with_any_password_masked():
    from retention.interfaces.web.app import _one_line

    error = Exception('could not connect to "mysql+pymysql://root:hunter2@db:3306/audit"\n[SQL: SELECT 1]')

    assert _one_line(error) == 'could not connect to "mysql+pymysql://root:***@db:3306/audit"'


def test_a_hold_checked_against_an_unreachable_target_is_not_a_500(client, tokens, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", "postgresql://crm:s3cr3t-pw@127.0.0.1:1/crm")

    answer = client.post("/holds", headers=bearer(tokens["editor"]), data={
        "category": "customer_accounts", "target": "customers", "case_id": "C", "reason": "r",
        "match": '{"email": "person9@example.com"}'}, follow_redirects=False)

    assert answer.status_code in (303, 400, 503), answer.text[:300]
    assert "s3cr3t-pw" not in answer.text


def test_a_form_from_the_public_base_url_is_accepted_behind_a_proxy_that_rewrites_host(client, tokens, monkeypatch):
    # nginx passes the upstream's name as Host unless told otherwise; the browser's Origin is the public one.
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    client.cookies.set("_token", tokens["editor"])

    elsewhere = client.post("/holds/1/release", data={"reason": "x"}, headers={"Origin": "https://evil.example"})
    ours = client.post("/holds/1/release", data={"reason": "settled"}, follow_redirects=False,
                       headers={"Origin": "https://airflow.example.com"})

    assert (elsewhere.status_code, ours.status_code) == (403, 303)


@pytest.mark.parametrize("payload", ['{}', '{"status": "complete", "targets": [{"name": 1}], "totals": []}',
                                     '{"action": "delete", "rule": "x", "targets": "abc", "holds": ["a"]}'])
def test_a_planted_row_that_is_json_but_no_certificate_is_shown_as_unreadable(client, tokens, payload):
    _plant("INSERT INTO purge_certificates (seq, category, run_id, status, issued_at, payload, signature, key_id,"
           " prev_hash, entry_hash) VALUES (4, 'customer_accounts', 'planted', 'complete', '2023-04-01 00:00:00',"
           " :payload, 'c2ln', 'k', 'p', 'e')", {"payload": payload})
    viewer = bearer(tokens["viewer"])

    listed, shown = client.get("/", headers=viewer), client.get("/certificates/4", headers=viewer)

    assert listed.status_code == 200 and 'data-seq="4"' in listed.text
    assert shown.status_code == 200 and "cannot be read as a certificate" in shown.text
    assert client.get("/verify?run=true", headers=viewer).text.count("Certificate seq 4") == 1
