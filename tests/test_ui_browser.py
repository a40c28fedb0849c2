"""The compliance page in a real browser: headless Chromium signs in to a running api-server.

The api-server (with scheduler and dag-processor, tests/airflow_stack.py) loads the plugin
through its ``airflow.plugins`` entry point; Chromium (Debian's, driven by selenium and
Debian's chromedriver) signs in on the simple auth manager's login page, opens the retention
page, finds the seeded run's certificates and has "verify now" report them valid.

Set ``RETENTION_UI_SCREENSHOTS=DIR`` to also write the screenshots docs/ui.md shows into DIR
(``make ui-screenshots`` does, into docs/).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from airflow_stack import ADMIN, AirflowStack
from retention.evidence.chain import read_certificates
from retention.evidence.checkpoints import CHECKPOINTS_ENV
from retention.holds import HoldRegistry
from retention.interfaces.cli import main

from conftest import connect, write_rule
from sqlpurge import insert_customers, make_customers

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
UTC = timezone.utc
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
NIGHTS = 3


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium under selenium; skipped only when Chromium or its driver is not installed."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1360,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def seeded(audit_db, sqlite_db, keys, tmp_path, monkeypatch):
    """Three nights of customer_accounts (a hold honoured), a category never run, and the
    environment the api-server needs to reach them."""
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit

    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=30 * i))
                                 for i in range(1, 41)])
    rules = tmp_path / "rules"
    write_rule(rules)
    write_rule(rules, "support_tickets", targets=[{"name": "tickets", "table": "tickets"}])
    sqlite_db.execute("CREATE TABLE tickets (id INTEGER PRIMARY KEY, closed_at TIMESTAMP)")
    registry = HoldRegistry(open_audit(from_environment))
    registry.add(category="customer_accounts", target="customers", match={"email": "person3@example.com"},
                 case_id="CASE-1", reason="chargeback dispute", by="legal")
    for night in range(NIGHTS - 1):
        assert main(["run", "--rules", str(rules), "--category", "customer_accounts",
                     "--as-of", f"2023-0{night + 1}-01T03:00:00Z", "--run-id", f"night-{night + 1}"]) == 0
    registry.release(1, reason="dispute settled", by="legal")
    assert main(["run", "--rules", str(rules), "--category", "customer_accounts", "--run-id", "tonight"]) == 0
    return {
        "AIRFLOW_CONN_RETENTION_AUDIT": audit_db.airflow_uri, "AIRFLOW_CONN_CRM_DB": sqlite_db.airflow_uri,
        "RETENTION_RULES_DIR": str(rules), "RETENTION_PUBLIC_KEYS": str(keys[1]),
        CHECKPOINTS_ENV: str(tmp_path / "checkpoints"),
        "PYTHONPATH": os.pathsep.join([*_entry_point_path(tmp_path), str(ROOT / "plugins"),
                                       os.environ.get("PYTHONPATH", "")]),
    }


def _entry_point_path(tmp_path: Path) -> list[str]:
    """Where the api-server finds the plugin's entry point: the installed package's metadata, or, when that
    install predates the entry point (an editable install is not re-run by a pull), the same entry point
    in a distribution's metadata made here, so the plugin still loads the way an install loads it."""
    installed = {e.name for e in importlib.metadata.entry_points(group="airflow.plugins")}
    if "retention" in installed:
        return []
    import tomllib

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["airflow.plugins"]
    info = tmp_path / "entry-points" / "retention_ui_test-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: retention-ui-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[airflow.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in entry.items()))
    return [str(info.parent)]


def test_a_compliance_officer_signs_in_sees_the_certificates_and_verifies_them(browser, seeded, pg_db, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as when
    from selenium.webdriver.support.ui import WebDriverWait

    stored = list(read_certificates(_audit()))
    wait = WebDriverWait(browser, 60)
    shots = Path(os.environ["RETENTION_UI_SCREENSHOTS"]) if os.environ.get("RETENTION_UI_SCREENSHOTS") else None

    def shoot(name: str) -> None:
        browser.save_screenshot(str(tmp_path / f"ui-{name}.png"))
        if shots is not None:
            shots.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(shots / f"ui-{name}.png"))

    with AirflowStack(tmp_path / "airflow", dags_folder=ROOT / "dags", metadata_url=pg_db.url, env=seeded) as stack:
        password = json.loads((stack.home / "simple_auth_manager_passwords.json").read_text())[ADMIN]
        browser.get(f"{stack.base_url}/retention/")
        assert "Sign in first" in browser.title  # anonymous: the page's 401 says where to sign in
        browser.find_element(By.LINK_TEXT, "Sign in to Airflow").click()

        wait.until(when.presence_of_element_located((By.NAME, "username"))).send_keys(ADMIN)
        browser.find_element(By.NAME, "password").send_keys(password)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

        # The login page sets the UI's session cookie and comes back to the retention page.
        table = wait.until(when.presence_of_element_located((By.ID, "certificates")))
        listed = [row.get_attribute("data-seq") for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert listed == [str(c.seq) for c in reversed(stored)]
        for certificate in stored:
            assert certificate.run_id in table.text
        shoot("certificates")

        browser.find_element(By.LINK_TEXT, "1").click()
        wait.until(when.presence_of_element_located((By.ID, "targets")))
        assert "CASE-1" in browser.find_element(By.ID, "honoured").text  # released since, still shown
        shoot("certificate")

        browser.find_element(By.LINK_TEXT, "Verify").click()
        button = wait.until(when.element_to_be_clickable((By.ID, "verify-now")))
        button.click()
        wait.until(when.staleness_of(button))
        result = wait.until(when.presence_of_element_located((By.ID, "result"))).text
        assert f"✓ {NIGHTS} certificates verified" in result
        assert stored[-1].entry_hash in result  # the chain head
        shoot("verify")

        browser.find_element(By.LINK_TEXT, "Status").click()
        assert "support_tickets" in wait.until(when.presence_of_element_located((By.ID, "status"))).text
        shoot("status")

        # Placing a hold through the page's form (the admin may edit every DAG).
        browser.find_element(By.LINK_TEXT, "Legal holds").click()
        form = wait.until(when.presence_of_element_located((By.ID, "place-hold")))
        for name, value in (("target", "customers"), ("case_id", "CASE-2"), ("reason", "subpoena"),
                            ("match", '{"email": "person40@example.com"}')):
            form.find_element(By.NAME, name).send_keys(value)
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(when.staleness_of(form))
        in_force = wait.until(when.presence_of_element_located((By.ID, "in-force"))).text
        assert "CASE-2" in in_force and "CASE-1" not in in_force
        assert "Placed hold #2" in browser.page_source and "CASE-1" in browser.find_element(By.ID, "history").text
        assert HoldRegistry(_audit()).get(2).placed_by == ADMIN
        shoot("holds")

        # The nav entry: the plugin's external view is listed for the Airflow UI.
        assert any(view["href"] == "retention/" for plugin in stack.api("GET", "/plugins")["plugins"]
                   for view in plugin.get("external_views", []))
    assert (tmp_path / "ui-verify.png").stat().st_size > 10_000


def _audit():
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit

    return open_audit(from_environment)
