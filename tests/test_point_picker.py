"""The Python side of the point picker (nodes/point_picker.py) with real ComfyUI modules: the point map route, the
picture the node returns for the picker, and the names the browser module (web/point_picker.js) relies on.

The picker in the browser is tested in the real frontend by tests/e2e/test_point_picker_ui.py.
"""

import asyncio
import io
import json
import re
import sys
import types

import numpy as np
import pytest
import torch
from comfy_support import REPO, load_pack
from fuzz_support import POINT_TEXTS, parses_or_user_error
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

pack = load_pack()
import folder_paths  # noqa: E402
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import make_mocked_request  # noqa: E402
from e2p_pack.e2p_core.errors import InputError  # noqa: E402
from e2p_pack.e2p_core.images import plan_geometry  # noqa: E402
from e2p_pack.e2p_core.pipeline import PointPrompt, rasterize_point_prompt  # noqa: E402
from e2p_pack.nodes import NODE_CLASS_MAPPINGS  # noqa: E402
from e2p_pack.nodes import point_picker  # noqa: E402
from e2p_pack.nodes.point_prompt import E2PPointPrompt  # noqa: E402

PICKER_JS = REPO / "web" / "point_picker.js"


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_the_point_map_is_the_pipelines_at_the_perceive_nodes_processing_size():
    # 'clicks' at the centre of a 128x96 image processed at 64 px: one Gaussian peaking at (32, 24) of a 64x48 map.
    query = {"points": '[{"x": 0.5, "y": 0.5}]', "coords_space": "normalized", "mode": "clicks", "width": "128",
             "height": "96", "resolution": "64"}
    clicks = decode(point_map_png := point_picker.point_map_png(query))
    assert clicks.shape == (48, 64) and clicks.dtype == np.uint8 and point_map_png.startswith(b"\x89PNG")
    assert divmod(int(clicks.argmax()), 64) == (24, 32) and clicks.max() == 255
    # Sigma 30 px at 768 -> 2.5 px at 64: one pixel off the peak is exp(-1 / (2 * 2.5^2)) = 0.923.
    assert abs(int(clicks[24, 33]) - 255 * np.exp(-1 / 12.5)) <= 1

    # The trained 'app' prompt, pixels, reference squash, native size: the pipeline's own map, to 8 bits.
    for resize_mode, resolution, geometry_resolution in (("reference", "96", 96), ("aligned", "0", "native")):
        query = {"points": "[[40, 30], [90, 70]]", "coords_space": "pixels", "mode": "app", "width": "128",
                 "height": "96", "resize_mode": resize_mode, "resolution": resolution}
        expected = rasterize_point_prompt(PointPrompt(points_px=np.array([[40.0, 30], [90, 70]]), mode="app"),
                                          plan_geometry((96, 128), resize_mode, geometry_resolution))
        assert np.array_equal(decode(point_picker.point_map_png(query)), np.round(expected * 255))

    # The node's defaults: auto coordinates, 'app', aligned at 768.
    default = decode(point_picker.point_map_png({"points": "[[0.5, 0.5]]", "width": "128", "height": "96"}))
    assert default.shape == (576, 768) and default.max() == 255


@pytest.mark.parametrize("query, message", [
    ({"points": "[[0.5, 0.5]]", "height": "96"}, "width is missing; expected an integer"),
    ({"points": "[[0.5, 0.5]]", "width": "12x", "height": "96"}, "width is '12x'"),
    ({"points": "[[0.5, 0.5]]", "width": "8", "height": "96"}, "at least 16x16"),
    ({"points": "[[200, 10]]", "width": "128", "height": "96"}, "outside the 128x96 image"),
    ({"points": "[{x: 1}]", "width": "128", "height": "96"}, "not valid JSON"),
    ({"points": "[[0.5, 0.5]]", "width": "128", "height": "96", "mode": "mask"}, "expected 'app' or 'clicks'"),
    ({"points": "[[0.5, 0.5]]", "width": "128", "height": "96", "resolution": "50"}, "resolution is 50"),
])
def test_bad_point_map_queries_are_input_errors(query, message):
    with pytest.raises(InputError, match=re.escape(message)):
        point_picker.point_map_png(query)


# Query values as a browser could send them. Junk (any text, any point JSON) must end in an InputError; well-formed
# queries (small sizes: the map is computed for real) must give a map of the processing size.
ANY_VALUE = st.one_of(st.none(), st.text(max_size=8), st.integers(-20, 300).map(str),
                      st.sampled_from(["0", "64", "auto", "pixels", "normalized", "app", "clicks", "mask", "aligned",
                                       "reference", "4097", "1e3"]))
CLICKS = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=4).map(
    lambda points: json.dumps([{"x": x, "y": y} for x, y in points]))


@settings(max_examples=40)
@given(points=POINT_TEXTS | st.none(), width=ANY_VALUE, height=ANY_VALUE, resolution=ANY_VALUE,
       coords_space=ANY_VALUE, mode=ANY_VALUE, resize_mode=ANY_VALUE)
def test_any_point_map_query_is_a_map_or_an_input_error(**values):
    query = {name: value for name, value in values.items() if value is not None}
    png = parses_or_user_error(point_picker.point_map_png, query)
    if png is not None:
        point_map = decode(png)
        assert point_map.ndim == 2 and point_map.dtype == np.uint8 and min(point_map.shape) >= 1


@settings(max_examples=20)
@given(points=CLICKS, width=st.integers(16, 200), height=st.integers(16, 200), resolution=st.sampled_from([0, 64, 96]),
       resize_mode=st.sampled_from(["aligned", "reference"]), mode=st.sampled_from(["app", "clicks"]))
def test_well_formed_point_map_queries_give_the_processing_size(points, width, height, resolution, resize_mode,
                                                                 mode):
    query = {"points": points, "coords_space": "normalized", "mode": mode, "width": str(width),
             "height": str(height), "resolution": str(resolution), "resize_mode": resize_mode}
    geometry = plan_geometry((height, width), resize_mode, "native" if resolution == 0 else resolution)
    assert decode(point_picker.point_map_png(query)).shape == geometry.resized_hw


def test_the_route_answers_a_png_or_a_400_with_the_message():
    good = make_mocked_request("GET", "/e2p/point_map?points=%5B%5B0.5%2C0.5%5D%5D&width=64&height=48&resolution=64")
    response = asyncio.run(point_picker._handle_point_map(good))
    assert response.status == 200 and response.content_type == "image/png"
    assert decode(response.body).shape == (48, 64)
    bad = make_mocked_request("GET", "/e2p/point_map?points=%5B%5B9%2C9%5D%5D&width=4&height=48")
    response = asyncio.run(point_picker._handle_point_map(bad))
    assert response.status == 400 and "at least 16x16" in response.text


def test_the_route_is_added_to_a_running_server_only(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert point_picker.register_routes() is False  # tests, packaging: no server, nothing imported
    routes = web.RouteTableDef()
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=types.SimpleNamespace(routes=routes)))
    monkeypatch.setitem(sys.modules, "server", server)
    assert point_picker.register_routes() is True
    assert [(route.method, route.path) for route in routes] == [("GET", point_picker.POINT_MAP_ROUTE)]


def test_the_node_returns_its_picture_for_the_picker(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    image = torch.rand(2, 1500, 600, 3, generator=torch.Generator().manual_seed(0))
    output = E2PPointPrompt().run(image, "[[0.5, 0.5]]", "auto", "clicks")
    point_prompt, preview = output["result"]
    assert point_prompt.image_hw == (1500, 600) and preview.shape == (1, 1500, 600)
    (entry,) = output["ui"][point_picker.PICTURE_UI_KEY]
    assert entry["type"] == "temp" and entry["subfolder"] == "" and (entry["width"], entry["height"]) == (600, 1500)
    saved = np.asarray(Image.open(tmp_path / entry["filename"]))
    assert saved.shape == (1024, 410, 3)  # the first frame, at most 1024 px a side
    expected = Image.fromarray(np.round(image[0].numpy() * 255).astype(np.uint8)).resize((410, 1024),
                                                                                         Image.BILINEAR)
    assert np.abs(saved.astype(int) - np.asarray(expected).astype(int)).max() <= 2
    # named by content: the same picture again is the same file, another picture another file
    assert E2PPointPrompt().run(image, "[]", "auto", "app")["ui"] == output["ui"]
    other = E2PPointPrompt().run(image.flip(1), "[]", "auto", "app")["ui"][point_picker.PICTURE_UI_KEY][0]
    assert other["filename"] != entry["filename"] and len(list(tmp_path.iterdir())) == 2


def test_the_browser_module_uses_the_names_the_python_side_defines():
    assert pack.WEB_DIRECTORY == "./web" and PICKER_JS.is_file()
    script = PICKER_JS.read_text()

    def js_constant(name: str) -> str:
        return re.search(rf'^const {name} = "([^"]*)";', script, re.MULTILINE).group(1)

    assert js_constant("PICTURE_UI_KEY") == point_picker.PICTURE_UI_KEY
    assert js_constant("POINT_MAP_ROUTE") == point_picker.POINT_MAP_ROUTE
    assert js_constant("NODE_TYPE") in NODE_CLASS_MAPPINGS
    assert js_constant("PERCEIVE_TYPE") in NODE_CLASS_MAPPINGS
    point_inputs = NODE_CLASS_MAPPINGS[js_constant("NODE_TYPE")].INPUT_TYPES()
    assert js_constant("POINTS_WIDGET") in point_inputs["required"]
    perceive_inputs = NODE_CLASS_MAPPINGS[js_constant("PERCEIVE_TYPE")].INPUT_TYPES()["required"]
    assert {"resize_mode", "resolution"} <= set(perceive_inputs)  # the settings the picker passes to the route
    assert 'from "../../scripts/app.js"' in script and not re.search(r"https?://", script)  # nothing remote
