"""The dashboard in a real browser: headless Chromium (Debian) driven by selenium, against a real `mutual serve`.

Arguments come from scripts/interop-dashboard.sh as environment variables. Prints one "ok ..." or "FAIL ..." line per
check. Decisions are read from what the pages carry for machines (`data-page`, `data-problem`, `data-audit`,
`data-count`), never from their words.
"""
import json
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import ssl
import time
import zlib

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, NoSuchElementException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

BASE = os.environ["BASE"]                  # https://127.0.0.1:PORT
ADMIN_LINK = os.environ["ADMIN_LINK"]
READONLY_LINK = os.environ["READONLY_LINK"]
EXPIRED_LINK = os.environ["EXPIRED_LINK"]
ATTACK_URL = os.environ["ATTACK_URL"]      # a page on another origin that posts a revocation to the dashboard
TARGET = os.environ["TARGET_SERIAL"]       # the certificate the user revokes
VICTIM = os.environ["VICTIM_SERIAL"]       # the certificate the attacker tries to revoke
IDENTITY = os.environ["TARGET_IDENTITY"]
MARKUP = os.environ["MARKUP_SERIAL"]       # a certificate whose CN and owner are markup
TOKEN_SECRET = os.environ["TOKEN_SECRET"]
TOKEN_ID = os.environ["TOKEN_ID"]
SHOTS = os.environ["SHOTS"]
MUTUAL = os.environ["MUTUAL"]
STATE = os.environ["STATE"]

passed = failed = 0


def ok(what):
    global passed
    passed += 1
    print(f"ok   {what}", flush=True)


def bad(what):
    global failed
    failed += 1
    print(f"FAIL {what}", flush=True)


def check(what, condition, detail=""):
    (ok if condition else bad)(what if condition or not detail else f"{what}: {detail}")


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1500",
                     # The authority's certificate chains to the private root this test made; a user imports root.pem.
                     "--ignore-certificate-errors", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def attribute(driver, selector, name):
    try:
        return driver.find_element(By.CSS_SELECTOR, selector).get_attribute(name)
    except NoSuchElementException:
        return None


def page(driver):
    return attribute(driver, "main", "data-page")


def problem(driver):
    return attribute(driver, "main", "data-problem")


def png_is_rendered(path):
    """A real render: a PNG of the window's size whose pixels are not all one colour (stdlib only: zlib)."""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False, "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    idat, offset = b"", 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            idat += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    raw = zlib.decompress(idat)
    distinct = len(set(raw[i:i + 3] for i in range(1, min(len(raw), 400_000), 7)))
    return width >= 800 and height >= 600 and distinct > 50, f"{width}x{height}, {distinct} distinct samples, {len(data)} bytes"


def shot(driver, name):
    path = os.path.join(SHOTS, f"dashboard-{name}.png")
    driver.save_screenshot(path)
    rendered, detail = png_is_rendered(path)
    check(f"screenshot {name}: a non-empty render ({detail})", rendered)


def no_script_ran(driver, where):
    try:
        driver.switch_to.alert
        bad(f"{where}: an alert opened: markup ran as script")
    except NoAlertPresentException:
        ok(f"{where}: no script ran")


def show(serial):
    out = subprocess.run([MUTUAL, "show", "--state-dir", STATE, "--json", serial], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def post(path, fields, cookie, origin):
    """A POST with the browser's session cookie, as a forger holding it would send one (stdlib urllib, real TLS)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(BASE + path, data=urllib.parse.urlencode(fields).encode(), method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie, "Origin": origin})
    try:
        with urllib.request.urlopen(request, context=context) as answer:
            return answer.status, answer.headers.get("Mutual-Problem", "")
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Mutual-Problem", "")


admin = browser()
try:
    # ---- sign in with the link: the code is gone from the address bar afterwards; the cookie is locked down
    admin.get(ADMIN_LINK)
    check("the login link lands on the overview", page(admin) == "overview", f"page {page(admin)!r} problem {problem(admin)!r}")
    check("no secret in the URL after login", "code=" not in admin.current_url and admin.current_url.endswith("/dashboard/"), admin.current_url)
    cookie = admin.get_cookie("__Host-mutual-dashboard")
    check("session cookie: HttpOnly, Secure, SameSite=Strict", bool(cookie) and cookie.get("httpOnly") and cookie.get("secure") and cookie.get("sameSite") == "Strict", str(cookie))
    counts = {e.get_attribute("data-count"): int(e.text) for e in admin.find_elements(By.CSS_SELECTOR, "[data-count]")}
    check("the overview counts certificates by status", counts.get("valid", 0) > 0 and "revoked" in counts and "expiring within 7 d" in counts, str(counts))
    check("the expiry timeline is an SVG drawn by the server", len(admin.find_elements(By.CSS_SELECTOR, "svg.chart rect")) > 5)
    check("no page carries a script element", not admin.find_elements(By.TAG_NAME, "script"))
    shot(admin, "overview")

    # ---- search for an identity, open the certificate
    admin.find_element(By.LINK_TEXT, "Inventory").click()
    WebDriverWait(admin, 10).until(expected_conditions.url_contains("/certificates"))
    check("the inventory opens", page(admin) == "inventory")
    field = admin.find_element(By.ID, "f-identity")
    check("the search fields have labels", all(admin.find_elements(By.CSS_SELECTOR, f"label[for='{i.get_attribute('id')}']")
                                                for i in admin.find_elements(By.CSS_SELECTOR, "form.filters input, form.filters select")))
    field.send_keys(IDENTITY)
    admin.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    WebDriverWait(admin, 10).until(expected_conditions.url_contains("identity="))
    rows = admin.find_elements(By.CSS_SELECTOR, "table tbody tr")
    check(f"searching {IDENTITY} finds its certificates", len(rows) >= 1 and all(IDENTITY in r.text for r in rows), f"{len(rows)} rows")
    check("the table is semantic (caption, column headers)", bool(admin.find_elements(By.CSS_SELECTOR, "table caption")) and bool(admin.find_elements(By.CSS_SELECTOR, "th[scope=col]")))
    shot(admin, "inventory")
    admin.get(f"{BASE}/dashboard/certificates/{TARGET}")
    text = admin.find_element(By.TAG_NAME, "main").text
    check("the certificate page decodes its fields and shows its PEM", IDENTITY in text and "subjectAltName" in text and "BEGIN CERTIFICATE" in text)
    check("the certificate page shows its audit events", "issue" in text)
    shot(admin, "certificate")

    # ---- revoke it, with confirmation
    admin.find_element(By.PARTIAL_LINK_TEXT, "Revoke this certificate").click()
    WebDriverWait(admin, 10).until(expected_conditions.url_contains("/revoke"))
    check("revoking asks for confirmation first", "/revoke" in admin.current_url and bool(admin.find_elements(By.ID, "confirm-revoke")))
    Select(admin.find_element(By.ID, "reason")).select_by_value("keyCompromise")
    shot(admin, "revoke")
    admin.find_element(By.ID, "confirm-revoke").click()
    try:
        WebDriverWait(admin, 10).until(expected_conditions.url_contains("done=revoked"))
    except Exception:
        bad(f"confirming did not lead back to the certificate: {admin.current_url} problem {problem(admin)!r}: {admin.find_element(By.TAG_NAME, 'main').text[:300]!r}")
    check("after confirming, the certificate page says revoked", bool(admin.find_elements(By.CSS_SELECTOR, "h1 .status-revoked")), admin.current_url)
    record = show(TARGET)
    check("the inventory has it revoked with the reason (mutual show)", record.get("status") == "revoked" and record.get("revocation_reason") == "keyCompromise", str(record)[:200])
    admin.find_element(By.LINK_TEXT, "Revocations").click()
    WebDriverWait(admin, 10).until(expected_conditions.url_contains("/revocations"))
    text = admin.find_element(By.TAG_NAME, "main").text
    check("it is listed under revocations with its reason and who revoked it", TARGET[:16] in text and "keyCompromise" in text and "dashboard:alice" in text)
    shot(admin, "revocations")
    admin.find_element(By.LINK_TEXT, "Audit trail").click()
    WebDriverWait(admin, 10).until(expected_conditions.url_contains("/audit"))
    check("the audit trail is verified at the top", attribute(admin, "[data-audit]", "data-audit") == "intact")
    text = admin.find_element(By.TAG_NAME, "main").text
    check("the revocation is in the audit trail with the dashboard actor", "dashboard:alice" in text and "revoke" in text)
    shot(admin, "audit")
    admin.find_element(By.LINK_TEXT, "Tokens").click()
    WebDriverWait(admin, 10).until(expected_conditions.url_contains("/tokens"))
    check("tokens are listed without their secret", TOKEN_ID in admin.page_source and TOKEN_SECRET not in admin.page_source)
    shot(admin, "tokens")

    # ---- markup in a certificate renders as text
    admin.get(f"{BASE}/dashboard/certificates/{MARKUP}")
    text = admin.find_element(By.TAG_NAME, "main").text
    stored = show(MARKUP).get("identity", "")
    check("a CN of <script>alert(1)</script> is shown as text, as the inventory holds it", "<script" in stored.replace("\\", "") and stored in text, f"{stored!r} in {text[:200]!r}")
    check("an owner of \"><img …> is shown as text", '"><img src=x onerror=alert(2)>' in text)
    check("and no element came from it", not admin.find_elements(By.CSS_SELECTOR, "main script, main img"))
    no_script_ran(admin, "the markup certificate page")
    admin.get(f"{BASE}/dashboard/certificates?owner=" + urllib.parse.quote('team"><img src=x onerror=alert(2)>'))
    check("searching by that owner finds it, shown as text", MARKUP[:16] in admin.page_source and not admin.find_elements(By.CSS_SELECTOR, "main img"))
    no_script_ran(admin, "the search for a markup owner")

    # ---- a forged cross-site POST, from a page on another origin, while signed in
    admin.get(ATTACK_URL)
    for _ in range(50):
        if admin.current_url.startswith(BASE):
            break
        time.sleep(0.1)
    code = problem(admin)
    check("a cross-site form posting a revocation is refused", code in ("login-required", "cross-site-request", "csrf-token-invalid"), f"{admin.current_url} {code!r}")
    check("and the certificate it aimed at is still valid", show(VICTIM).get("status") == "valid")
    session = f"__Host-mutual-dashboard={cookie['value']}" if cookie else ""
    status, code = post(f"/dashboard/certificates/{VICTIM}/revoke", {"reason": "keyCompromise"}, session, BASE)
    check("a POST with the session cookie but no anti-forgery token is refused (403 csrf-token-invalid)", status == 403 and code.endswith(":csrf-token-invalid"), f"{status} {code}")
    status, code = post(f"/dashboard/certificates/{VICTIM}/revoke", {"reason": "keyCompromise"}, session, "https://evil.example")
    check("a POST from another origin is refused (403 cross-site-request)", status == 403 and code.endswith(":cross-site-request"), f"{status} {code}")
    check("still valid", show(VICTIM).get("status") == "valid")

    # ---- a used code is refused; logging out ends the session
    admin.get(ADMIN_LINK)
    check("a login link used twice is refused (login-used)", problem(admin) == "login-used", f"{problem(admin)!r}")
    shot(admin, "refused")
    admin.get(f"{BASE}/dashboard/")
    admin.find_element(By.CSS_SELECTOR, "header form button").click()
    WebDriverWait(admin, 10).until(expected_conditions.url_contains("/login"))
    admin.get(f"{BASE}/dashboard/")
    check("after logging out, the dashboard needs a login", problem(admin) == "login-required", f"{problem(admin)!r}")
    admin.get(EXPIRED_LINK)
    check("an expired login link is refused (login-expired)", problem(admin) == "login-expired", f"{problem(admin)!r}")
finally:
    admin.quit()

auditor = browser()
try:
    auditor.get(READONLY_LINK)
    check("a read-only link signs in", page(auditor) == "overview", f"{problem(auditor)!r}")
    auditor.get(f"{BASE}/dashboard/certificates/{VICTIM}")
    check("a read-only session sees the certificate but no revoke action", page(auditor) == "inventory" and not auditor.find_elements(By.PARTIAL_LINK_TEXT, "Revoke"))
    shot(auditor, "read-only")
    auditor.get(f"{BASE}/dashboard/certificates/{VICTIM}/revoke")
    check("a read-only session cannot open the revoke form (read-only-session)", problem(auditor) == "read-only-session", f"{problem(auditor)!r}")
    auditor.get(f"{BASE}/dashboard/")
    csrf = auditor.find_element(By.CSS_SELECTOR, "header input[name=csrf]").get_attribute("value")
    cookie = auditor.get_cookie("__Host-mutual-dashboard")
    status, code = post(f"/dashboard/certificates/{VICTIM}/revoke", {"reason": "keyCompromise", "csrf": csrf}, f"__Host-mutual-dashboard={cookie['value']}", BASE)
    check("a read-only session's POST, token and all, is refused (403 read-only-session)", status == 403 and code.endswith(":read-only-session"), f"{status} {code}")
    check("the certificate is still valid", show(VICTIM).get("status") == "valid")
finally:
    auditor.quit()

print(f"dashboard browser: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
