"""A real headless Chromium (Debian's `chromium`, installed here when missing) driven by
Playwright, which never downloads a browser of its own: the dashboards are checked the way a
person sees them, JavaScript errors and all."""
import os
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

# The flags a sandboxed root without network needs: no sandbox (root), no GPU, and none of
# Chromium's own connections to Google's services, which this machine refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    """/usr/bin/chromium, installed with apt-get (as the CI's root) when it is not there."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.fail("Debian's chromium is not installed and this is not root: sudo apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Page:
    page: object
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and console errors
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    p = context.new_page()
    out = Page(p)
    p.on("pageerror", lambda e: out.errors.append(f"uncaught: {e}"))
    p.on("console", lambda m: m.type == "error" and out.errors.append(f"console: {m.text}"))
    p.on("request", lambda r: out.requests.append(r.url))
    yield out
    context.close()
