"""ComfyUI's real web frontend in headless Chromium (Playwright for Python driving Debian's ``chromium``).

The page is the one the test server serves (comfyui-frontend-package 1.32.9). A workflow is loaded with
``app.loadGraphData`` exactly as when a user opens the file; the node types are checked against LiteGraph's
registry (filled from the server's ``/object_info``, so our nodes are there only if the pack registered them), and
``app.graphToPrompt()`` turns the UI graph into the API prompt the Queue button would send. Only 127.0.0.1 is
contacted: any other request is aborted and recorded.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
READY_TIMEOUT_MS = 180_000
# Per-user settings (merged by POST /settings) for an unobstructed canvas: no first-run templates dialog (it would
# cover the canvas), no minimap, no zoom menu.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasMenu": False,
               "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.2}  # keep text on a zoomed-out graph
# For graph screenshots: hide the menus, tabs, banners and sidebar that float over the canvas, and toasts.
_HIDE_CHROME_CSS = ".splitter-overlay-root, .splitter-overlay-root *, .p-toast { visibility: hidden !important; }"

# In the page: load one UI workflow, report its nodes and the API prompt the frontend makes of it.
_LOAD_JS = r"""
async (workflow) => {
  const app = window.app;
  const toasts = () => [...document.querySelectorAll('.p-toast-message')].map(t => t.textContent.trim());
  const toastsBefore = new Set(toasts());
  const registry = (window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph).registered_node_types;
  const loadErrors = [];
  try {
    await app.loadGraphData(workflow, true, true, null,
      { showMissingNodesDialog: false, showMissingModelsDialog: false });
  } catch (e) { loadErrors.push(String(e && e.stack || e)); }
  const nodes = (app.graph.nodes ?? app.graph._nodes).map(n => ({ id: String(n.id), type: n.type }));
  let apiPrompt = null, apiError = null;
  try { apiPrompt = (await app.graphToPrompt()).output; } catch (e) { apiError = String(e && e.stack || e); }
  await new Promise(resolve => setTimeout(resolve, 300));  // toasts render asynchronously
  return { nodes, missing_types: [...new Set(nodes.filter(n => !registry[n.type]).map(n => n.type))],
           load_errors: loadErrors, alerts: toasts().filter(t => !toastsBefore.has(t)),
           api_prompt: apiPrompt, api_error: apiError };
}
"""
_READY_JS = """() => {
  const L = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
  return !!(window.app && window.app.graph && window.app.canvas && L
            && Object.keys(L.registered_node_types || {}).length > 50);
}"""


@dataclass
class LoadedWorkflow:
    node_types: list[str]
    missing_types: list[str]
    load_errors: list[str]
    alerts: list[str]  # toasts the frontend showed while loading (e.g. "Invalid workflow against zod schema")
    api_prompt: dict[str, Any] | None
    api_error: str | None


@dataclass
class FrontendLog:
    page_errors: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("chromium is not installed; run `bash tests/e2e/install.sh` (apt-get install chromium)")
    return path


class Frontend:
    """A headless Chromium page on the server's UI; use as a context manager."""

    def __init__(self, url: str, viewport: tuple[int, int] = (1600, 1000)):
        self.url = url
        self.viewport = viewport
        self.log = FrontendLog()
        self.ready_s: float | None = None

    def __enter__(self) -> Frontend:
        from playwright.sync_api import sync_playwright

        _post_json(self.url + "/settings", UI_SETTINGS)
        self._profile = tempfile.mkdtemp(prefix="e2p-e2e-chromium-")
        self._playwright = sync_playwright().start()
        try:
            self._context = self._playwright.chromium.launch_persistent_context(
                self._profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self._context.route("**/*", self._only_local)
            self.page = self._context.pages[0] if self._context.pages else self._context.new_page()
            self.page.on("pageerror", lambda error: self.log.page_errors.append(str(error)[:1000]))
            started = time.monotonic()
            self.page.goto(self.url, wait_until="domcontentloaded", timeout=READY_TIMEOUT_MS)
            # node definitions are registered asynchronously after /object_info arrives
            self.page.wait_for_function(_READY_JS, timeout=READY_TIMEOUT_MS, polling=250)
            self.ready_s = time.monotonic() - started
            self.page.keyboard.press("Escape")  # close a first-run dialog, if any
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        context, self._context = getattr(self, "_context", None), None
        if context is not None:
            context.close()
        self._playwright.stop()
        shutil.rmtree(self._profile, ignore_errors=True)

    def load(self, workflow: dict[str, Any]) -> LoadedWorkflow:
        result = self.page.evaluate(_LOAD_JS, workflow)
        return LoadedWorkflow(
            node_types=[node["type"] for node in result["nodes"]], missing_types=result["missing_types"],
            load_errors=result["load_errors"], alerts=result["alerts"], api_prompt=result["api_prompt"],
            api_error=result["api_error"])

    def screenshot_graph(self, path: Path, width: int = 1600, quality: int = 85) -> None:
        """A JPEG of the canvas with the whole loaded graph in view and nothing floating over it, scaled to
        ``width`` pixels (a large viewport then a downscale keeps small text legible)."""
        self.page.add_style_tag(content=_HIDE_CHROME_CSS)
        self.page.evaluate("""() => {
          window.app.canvas.show_info = false;  // LiteGraph's frame-time/node-count text in the corner
          return window.app.extensionManager.command.execute('Comfy.Canvas.FitView');
        }""")
        self.page.wait_for_timeout(500)
        shot = Image.open(io.BytesIO(self.page.screenshot(type="png"))).convert("RGB")
        shot.resize((width, round(shot.height * width / shot.width)), Image.LANCZOS).save(path, quality=quality)

    def _only_local(self, route) -> None:
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            self.log.blocked_requests.append(url[:200])
            route.abort()


def read_workflow(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _post_json(url: str, body: Any) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30):
        pass
