"""The point picker of 'Edit2Perceive Point Prompt' (web/point_picker.js) in ComfyUI's real frontend.

A user's session, in headless Chromium against the session's real server: open the matting workflow, clear its
points with the node's button, click two points on the picture inside the node, check the text widget and the API
prompt the Queue button sends, queue it from the page on the test model, save and reload the workflow, zoom the
graph and resize the node, find the points drawn at the same places on screen, remove one by clicking it and the
other by a right-click.

The point map the model received is observed through the workflow itself: the perceive node runs at the image's
own size (resolution 0), where the map the pipeline feeds the model and the point node's preview MASK (saved by the
workflow's PreviewImage) are the same rasterisation at the same size. Its peaks must lie in the clicks' disks, and
the picker's glow (the server's point map route, asked as the picker asks it) must be that same map.

Where the picture sits in the node is worked out here independently ("contain": the whole picture, centred); a
picker that drew it elsewhere would put the clicks at other image coordinates and fail the checks.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from .conftest import ODD_SIZE_WH
from .frontend import Frontend, read_workflow
from .test_workflows_ui import SWAPS, WORKFLOW_DIR, WORKFLOW_IMAGES

POINT_NODE = "E2PPointPrompt"
NATIVE_RESOLUTION = 0  # E2PPerceive's resolution for "process at the image's own size"
CLICKS = [(0.25, 0.5), (0.75, 0.5)]  # normalized (x, y) on the picture: far enough apart for separate disks
MARKER_RGB = (0, 255, 102)  # the picker's point marker (MARKER_FILL in web/point_picker.js)
# The reference app's click disk: 100 px at 768 px, scaled to the preview's size (the image's own, 83 x 61).
DISK_RADIUS_PX = 100 * max(ODD_SIZE_WH) / 768

_NODE_JS = "(app.graph.nodes ?? app.graph._nodes).find(n => n.type === 'E2PPointPrompt')"

# Put the node in view at a given zoom and size; return where its picker canvas is on screen (client pixels) and
# its layout size (node pixels), once the picture has loaded.
_SHOW_JS = r"""
async ({scale, size}) => {
  const node = %s;
  node.setSize(size);
  app.canvas.ds.scale = scale;
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  const picker = node.widgets.find(w => w.name === 'point_picker').element;
  const canvas = picker.querySelector('canvas');
  for (let i = 0; i < 100 && !picker.querySelector('.e2p-picker-status').textContent.includes('83×61'); i++) {
    await new Promise(resolve => setTimeout(resolve, 100));
  }
  await new Promise(resolve => setTimeout(resolve, 300));  // DOM widgets follow the canvas on its next frames
  const box = canvas.getBoundingClientRect();
  return {box: [box.left, box.top, box.width, box.height], layout: [canvas.clientWidth, canvas.clientHeight],
          status: picker.querySelector('.e2p-picker-status').textContent};
}
""" % _NODE_JS

_POINTS_JS = "() => %s.widgets.find(w => w.name === 'positive_coords').value" % _NODE_JS

# Set the test files in the graph (the swaps of test_workflows_ui) and queue it as the Queue button does.
_QUEUE_JS = r"""
async (swaps) => {
  for (const node of app.graph.nodes ?? app.graph._nodes) {
    for (const [type, name, value] of swaps) {
      const widget = node.type === type && (node.widgets ?? []).find(w => w.name === name);
      if (widget && widget.value !== 'none') widget.value = value;
    }
  }
  const prompt = await app.graphToPrompt();
  return await window.comfyAPI.api.api.queuePrompt(0, prompt);
}
"""

# Unlink the node's image input and read the picker's status once it has redrawn; link it back.
_UNLINKED_STATUS_JS = r"""
async () => {
  const node = %s;
  const upstream = node.getInputNode(0);
  node.disconnectInput(0);
  app.canvas.setDirty(true, true);
  await new Promise(resolve => setTimeout(resolve, 500));
  const status = node.widgets.find(w => w.name === 'point_picker').element
    .querySelector('.e2p-picker-status').textContent;
  upstream.connect(0, node, 0);
  return status;
}
""" % _NODE_JS

_TYPE_POINTS_JS = r"""
async (text) => {
  const node = %s;
  node.widgets.find(w => w.name === 'coords_space').value = 'auto';
  node.widgets.find(w => w.name === 'positive_coords').value = text;
  app.canvas.setDirty(true, true);
  await new Promise(resolve => setTimeout(resolve, 500));
}
""" % _NODE_JS


def screen_point(view: dict, point: tuple[float, float]) -> tuple[float, float]:
    """Client pixels of a normalized picture point, for the picture drawn whole and centred in the picker."""
    left, top, box_w, box_h = view["box"]
    layout_w, layout_h = view["layout"]
    fit = min(layout_w / ODD_SIZE_WH[0], layout_h / ODD_SIZE_WH[1])
    x = (layout_w - ODD_SIZE_WH[0] * fit) / 2 + point[0] * ODD_SIZE_WH[0] * fit
    y = (layout_h - ODD_SIZE_WH[1] * fit) / 2 + point[1] * ODD_SIZE_WH[1] * fit
    zoom = box_w / layout_w  # the graph's zoom, applied to the element as a CSS transform
    return left + x * zoom, top + y * zoom


def picture_px_on_screen(view: dict) -> float:
    """Client pixels per picture pixel."""
    return min(view["layout"][0] / ODD_SIZE_WH[0], view["layout"][1] / ODD_SIZE_WH[1]) * view["box"][2] / view[
        "layout"][0]


def read_points(text: str) -> list[tuple[float, float]]:
    return [(point["x"], point["y"]) for point in json.loads(text)]


@pytest.fixture
def frontend(comfy):
    for workflow_name, test_picture in WORKFLOW_IMAGES.items():
        shutil.copyfile(comfy.input_dir / test_picture, comfy.input_dir / workflow_name)
    with Frontend(comfy.server.url) as page:
        yield page
    assert not page.log.page_errors, page.log.page_errors
    assert not page.log.blocked_requests, page.log.blocked_requests


def test_points_clicked_on_the_picture_reach_the_model_and_survive_a_reload(comfy, frontend):
    page = frontend.page
    loaded = frontend.load(read_workflow(WORKFLOW_DIR / "e2p_matting_composite.json"))
    assert not loaded.missing_types and not loaded.load_errors
    view = page.evaluate(_SHOW_JS, {"scale": 1.0, "size": [360, 560]})
    assert view["status"].startswith("83×61"), view["status"]  # the Load Image's picture, before any run

    page.locator(".e2p-clear-points").click()
    assert page.evaluate(_POINTS_JS) == "[]"
    for click in CLICKS:
        page.mouse.click(*screen_point(view, click))
    points = read_points(page.evaluate(_POINTS_JS))
    tolerance = 1.0 / (picture_px_on_screen(view) * min(ODD_SIZE_WH))  # one screen pixel, in picture units
    assert np.allclose(points, CLICKS, atol=tolerance), points

    # What the Queue button sends: the widget's text as positive_coords, nothing of the picker.
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    point_id, point_node = next((i, n) for i, n in prompt.items() if n["class_type"] == POINT_NODE)
    assert point_node["inputs"]["positive_coords"] == page.evaluate(_POINTS_JS)
    assert "point_picker" not in point_node["inputs"]

    # Queued from the page on the test model, processed at the image's own size (see the module's docstring).
    swaps = {**SWAPS, ("E2PPerceive", "resolution"): NATIVE_RESOLUTION}
    queued = page.evaluate(_QUEUE_JS, [[node_type, name, value] for (node_type, name), value in swaps.items()])
    entry = comfy.server.wait(queued["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    (preview_path,) = comfy.server.output_images(entry, _preview_of(entry["prompt"][2], point_id))
    point_map = np.asarray(Image.open(preview_path).convert("L"), dtype=np.float32) / 255
    _assert_peaks_in_click_disks(point_map, [(x * ODD_SIZE_WH[0], y * ODD_SIZE_WH[1]) for x, y in points])
    glow_query = urllib.parse.urlencode({
        "points": point_node["inputs"]["positive_coords"], "coords_space": "normalized", "mode": "app",
        "width": ODD_SIZE_WH[0], "height": ODD_SIZE_WH[1], "resize_mode": "aligned", "resolution": NATIVE_RESOLUTION})
    glow = np.asarray(Image.open(io.BytesIO(comfy.server.get_bytes(f"/e2p/point_map?{glow_query}"))))
    assert np.abs(glow / 255 - point_map).max() <= 1.5 / 255  # 8-bit: the route rounds, the preview truncates
    assert entry["outputs"][point_id]["e2p_picture"][0]["width"] == ODD_SIZE_WH[0]  # the picture of the run
    # Without its Load Image the node shows the picture of that run.
    assert page.evaluate(_UNLINKED_STATUS_JS).startswith("83×61")

    # Saved and reopened: the same text, nothing of the picker in the file, the points drawn where they were
    # clicked, also zoomed in on a larger node.
    saved = json.loads(json.dumps(page.evaluate("() => app.graph.serialize()")))
    saved_node = next(node for node in saved["nodes"] if node["type"] == POINT_NODE)
    assert saved_node["widgets_values"][0] == point_node["inputs"]["positive_coords"]
    assert len(saved_node["widgets_values"]) == 4  # positive_coords, coords_space, mode, negative_coords
    frontend.load(saved)
    assert read_points(page.evaluate(_POINTS_JS)) == points
    view = page.evaluate(_SHOW_JS, {"scale": 1.6, "size": [460, 720]})
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(type="png"))).convert("RGB")).astype(int)
    for point in points:
        x, y = (round(value) for value in screen_point(view, point))
        assert np.abs(shot[y, x] - MARKER_RGB).max() <= 40, f"no point marker at {point}: {shot[y, x]}"

    # A click on a point removes it; the other stays.
    page.mouse.click(*screen_point(view, points[0]))
    assert read_points(page.evaluate(_POINTS_JS)) == points[1:]
    page.mouse.click(*screen_point(view, points[1]), button="right")  # so does a right-click
    assert page.evaluate(_POINTS_JS) == "[]"

    # Typed pixel coordinates, read as 'auto' reads them (beyond 0..1: pixels), are drawn on the same pixel.
    page.evaluate(_TYPE_POINTS_JS, '[{"x": 62, "y": 30}]')
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot(type="png"))).convert("RGB")).astype(int)
    x, y = (round(value) for value in screen_point(view, (62 / ODD_SIZE_WH[0], 30 / ODD_SIZE_WH[1])))
    assert np.abs(shot[y, x] - MARKER_RGB).max() <= 40, f"no point marker at pixel (62, 30): {shot[y, x]}"


def _preview_of(prompt: dict, point_id: str) -> str:
    """The PreviewImage showing the point node's preview MASK (through MaskToImage)."""
    to_image = next(i for i, n in prompt.items()
                    if n["class_type"] == "MaskToImage" and n["inputs"]["mask"] == [point_id, 1])
    return next(i for i, n in prompt.items()
                if n["class_type"] == "PreviewImage" and n["inputs"]["images"] == [to_image, 0])


def _assert_peaks_in_click_disks(point_map: np.ndarray, clicks_px: list[tuple[float, float]]) -> None:
    """The trained 'app' prompt: up to 10 peaks of value 1, each inside the disk of a click, every disk used."""
    rows, cols = np.nonzero(point_map >= 254.5 / 255)
    assert 1 <= len(rows) <= 10, f"{len(rows)} peaks"
    distances = np.hypot(cols[:, None] - np.array([x for x, _ in clicks_px]),
                         rows[:, None] - np.array([y for _, y in clicks_px]))  # [peaks, clicks]
    # +1 px: the reference truncates a click to whole pixels before drawing its disk
    assert (distances.min(axis=1) <= DISK_RADIUS_PX + 1).all(), distances
    assert (distances.min(axis=0) <= DISK_RADIUS_PX + 1).all(), distances

