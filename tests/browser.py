"""Drive a real JupyterLab (or Notebook 7) in headless Chromium, for tests/test_browser.py.

`jupyter_server(app, root)` starts the server on a free loopback port with its config, data, runtime and
workspace folders in a temporary folder (nothing of the user's is read or written), and stops it through
POST /api/shutdown, waiting for the one process it started. `chromium_page(profile)` opens a Playwright
persistent context on Debian's chromium (Playwright's own browsers cannot be downloaded here), with the flags
that keep it off the network. `open_notebook` / `run_all` / `kernel_idle` do what a person does in the UI.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
APPS = {"lab": "jupyterlab", "notebook": "notebook"}


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def missing(app: str = "lab") -> str | None:
    """Why a browser test cannot run here (what to install), or None."""
    import importlib.util

    if chromium() is None:
        return "chromium is not installed (apt-get install -y chromium)"
    for module, package in (("playwright", "playwright"), (APPS[app], APPS[app]), ("anywidget", "anywidget")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {package})"
    return None


def workspace(app: str, tmp_path: Path) -> tuple[Path, Path]:
    """The notebook folder and the isolated home of one browser test; skips the test where `app` cannot run."""
    import pytest

    reason = missing(app)
    if reason:
        pytest.skip(reason)
    root, home = tmp_path / "work", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    return root, home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    app: str
    url: str
    token: str
    root: Path
    proc: subprocess.Popen
    log: Path
    leftover: tuple = ()  # processes the server started (kernels) still alive after it stopped: must stay empty

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.url}{path}?token={self.token}", method=method,
                                         data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else None

    def page_url(self, notebook: str) -> str:
        where = "lab/tree" if self.app == "lab" else "notebooks"
        return f"{self.url}/{where}/{notebook}?token={self.token}"

    def kernel_ready(self) -> bool:
        """The notebook's kernel is idle and the page's websocket is connected to it."""
        try:
            sessions = self.api("/api/sessions")
        except (OSError, ValueError):
            return False
        return any(s["kernel"]["execution_state"] == "idle" and s["kernel"].get("connections", 0) >= 1
                   for s in sessions)


def isolated_env(home: Path) -> dict:
    """Jupyter and IPython folders of their own, and the lab news/update pop-ups switched off."""
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("JUPYTERLAB_SETTINGS_DIR", "config/lab/user-settings")):
        env[var] = str(home / sub)
        (home / sub).mkdir(parents=True, exist_ok=True)
    settings = home / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).resolve().parent.parent),
                                                    env.get("PYTHONPATH", "")] if p)
    return env


@contextlib.contextmanager
def jupyter_server(app: str, root: Path, home: Path, timeout: float = 30):
    """A Jupyter server serving `root`; yields a Server, then shuts it (and its kernels) down."""
    port, token = free_port(), secrets.token_hex(16)
    args = [sys.executable, "-m", APPS[app], "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}"]
    if app == "lab":
        args += ["--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
                 "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = home / f"{app}-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=root, env=isolated_env(home), stdout=out, stderr=subprocess.STDOUT)
    server = Server(app, f"http://127.0.0.1:{port}", token, root, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {app} server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                server.api("/api/status")
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {app} server did not answer in {timeout} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield server
    finally:
        stop(server)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc; elsewhere none are known)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in task.read_text().split()]
                found += kids
                todo += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop(server: Server) -> None:
    """POST /api/shutdown (which stops the kernels too), then wait for the process; only if it hangs, end it
    (the one PID this harness started, nothing found by name). Its kernels must be gone soon after:
    any still alive are listed in `server.leftover` (not killed: the test fails on them)."""
    children = descendants(server.proc.pid)
    if server.proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            server.api("/api/shutdown", method="POST")
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
    deadline = time.monotonic() + 5
    while [p for p in children if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    server.leftover = tuple(p for p in children if alive(p))


@contextlib.contextmanager
def chromium_page(profile: Path, width: int = 1200, height: int = 900):
    """A page of a headless chromium with a profile of its own; closed (browser and all) afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.messages = []  # console errors and page errors, to show when a test fails
            page.on("console", lambda m: page.messages.append(f"console.{m.type}: {m.text}") if m.type in (
                "error", "warning") else None)
            page.on("pageerror", lambda e: page.messages.append(f"pageerror: {e}"))
            yield page
        finally:
            context.close()


def write_notebook(path: Path, cells: list[str]) -> Path:
    """A notebook of code cells, with the python3 kernelspec in its metadata (no "Select Kernel" dialog)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, path)
    return path


def wait_until(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def open_notebook(page, server: Server, notebook: str, timeout: float = 30) -> None:
    """Open the notebook and wait until its kernel is idle and connected (the first run can be lost before)."""
    page.goto(server.page_url(notebook), timeout=timeout * 1000)
    page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(timeout=timeout * 1000)
    page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(
        state="attached", timeout=timeout * 1000)
    wait_until(server.kernel_ready, timeout, "the kernel to be idle and connected")


def run_all(page, cells: int, timeout: float = 30) -> None:
    """Run the first `cells` cells, with the keyboard as a person does (Shift+Enter runs and moves on; the
    last one runs with Control+Enter so no new cell is added), then wait for them to finish. A cell that
    raised fails here, with its traceback."""
    first = page.locator(".jp-Notebook .jp-Cell .cm-content").first
    for attempt in range(2):
        first.click()
        page.keyboard.press("Escape")  # command mode, on the first cell
        for _ in range(cells - 1):
            page.keyboard.press("Shift+Enter")
        page.keyboard.press("Control+Enter")
        try:  # each prompt reads "[n]:" once its cell ran, "[*]:" while queued or running; an error stops the rest
            page.wait_for_function(
                """n => { const p = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
                                    .slice(0, n);
                          const done = p.length === n && p.every(e => /\\[\\d+\\]/.test(e.textContent));
                          const busy = p.some(e => e.textContent.includes('*'));
                          return done || (!busy && document.querySelector(ERROR) !== null); }""".replace(
                    "ERROR", repr(ERROR)), arg=cells, timeout=timeout * 1000)
            break
        except Exception:
            prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_text_contents()[:cells]
            if attempt or any("*" in p for p in prompts):
                raise AssertionError(f"the cells did not finish in {timeout} s: prompts {prompts}\n"
                                     f"{outputs_text(page)}\n{page.messages}") from None
            # The race of the notes: the run keys went out before the kernel connection was up; once more.
    if page.locator(ERROR).count():
        raise AssertionError(f"a cell failed:\n{outputs_text(page)}")


ERROR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


def outputs_text(page) -> str:
    return "\n".join(page.locator(".jp-Notebook .jp-OutputArea").all_inner_texts())
