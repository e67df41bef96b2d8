"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): the property every user-input parser must keep, and
hypothesis strategies for the inputs users can give.

The property: any input either parses, or ends in the project's own error (``e2p_core.errors.E2PError``) with a
message -- never another exception, which would reach a ComfyUI user or a CLI user as a raw traceback.
"""

import contextlib
import io
import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st


def budget(ci_examples: int) -> settings:
    """Settings for a test whose examples are costly: ``ci_examples`` under the CI profile's budget, scaled alike
    under the other profiles (``explore`` searches longer)."""
    ci_budget = settings.get_profile("ci").max_examples
    return settings(max_examples=max(1, settings.default.max_examples * ci_examples // ci_budget))


def is_project_error(error: BaseException) -> bool:
    """True for ``E2PError`` and its subclasses, from ``e2p_core`` or the ComfyUI-loaded copy ``e2p_pack.e2p_core``."""
    return any(cls.__name__ == "E2PError" and cls.__module__.endswith("e2p_core.errors") for cls in type(error).__mro__)


def parses_or_user_error(call, *args, **kwargs):
    """``call(*args, **kwargs)``, or None when it raised the project's error with a message; anything else raises."""
    try:
        return call(*args, **kwargs)
    except Exception as error:
        if not is_project_error(error):
            raise
        assert str(error).strip(), f"{type(error).__name__} without a message"
        return None


def run_cli_expecting_error(main, argv: list[str], out_dir: Path) -> str:
    """Run the CLI in-process; it must exit with status 2, print ``error: <message>`` and leave ``out_dir`` empty."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(argv)
    message = stderr.getvalue()
    assert status == 2, f"status {status}, stderr {message[-500:]!r}"
    assert message.startswith("error: ") and len(message.strip()) > len("error:"), message
    written = sorted(path.name for path in out_dir.rglob("*")) if out_dir.exists() else []
    assert written == [], f"files written despite the error: {written}"
    return message


# --------------------------------------------------------------------------------------------------- point JSON

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                         st.integers(min_value=10**20, max_value=10**400))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(["x", "y", "z"]) | st.text(max_size=3), inner,
                                             max_size=3), max_leaves=12)
POINT_LISTS = st.lists(st.one_of(st.fixed_dictionaries({"x": JSON_SCALARS, "y": JSON_SCALARS}),
                                 st.lists(JSON_SCALARS, max_size=3)), max_size=5)
POINT_TEXTS = st.one_of(
    st.text(),
    st.text(alphabet="[]{}\"',:0123456789.-+eE xyNaInfity\\\n"),
    JSON_VALUES.map(json.dumps),
    POINT_LISTS.map(json.dumps),
    POINT_LISTS.map(lambda points: json.dumps(points).replace('"', "'")),
    POINT_LISTS.map(lambda points: json.dumps(json.dumps(points))),  # quoted once more, as KJNodes' '""'
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),  # nesting deeper than the recursion limit
    st.integers(300, 6000).map(lambda digits: f"[[{'7' * digits}, 1]]"),  # beyond float, beyond int-from-str
    st.lists(st.tuples(st.integers(0, 64), st.integers(0, 48)), min_size=1, max_size=80).map(json.dumps),
)

# ------------------------------------------------------------------------------------------------ maps and masks

MAP_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.uint8, np.uint16, np.int32, np.int64, np.bool_])


@st.composite
def arrays(draw, shapes=None):
    """numpy arrays of any rank 0..4 (empty sides included), any common dtype, NaN and infinities included."""
    from hypothesis.extra.numpy import array_shapes, arrays as numpy_arrays

    shape = draw(shapes if shapes is not None else array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    dtype = np.dtype(draw(MAP_DTYPES))
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    else:
        elements = None
    return draw(numpy_arrays(dtype, shape, elements=elements))


# --------------------------------------------------------------------------------------------- safetensors files

SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                      "U16", "U32", "U64", "C64", "F4", "XYZ"]


@st.composite
def safetensors_bytes(draw):
    """Bytes that are, or are almost, a safetensors file: random, truncated, with an oversized or lying header
    length, a header that is not JSON, or a JSON header with random dtypes, shapes, offsets and metadata."""
    kind = draw(st.sampled_from(["random", "header", "header", "header", "truncated", "length"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    entries = {}
    offset = 0
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["prompt_embeds", "pooled_prompt_embeds", "img_in.weight", "noise",
                                     "point_map", "encoder.conv_in.weight", "lora_unet_x.lora_down.weight"])
                    | st.text(max_size=6))
        shape = draw(st.lists(st.integers(0, 4), max_size=3) | st.just([-1]) | st.just([2**62, 2**62]))
        size = draw(st.integers(0, 48))
        start = draw(st.sampled_from([offset, offset + 1, 0]))
        entries[name] = draw(st.sampled_from([
            {"dtype": draw(st.sampled_from(SAFETENSORS_DTYPES)), "shape": shape, "data_offsets": [start, start + size]},
            {"dtype": "F32", "shape": shape},
            {"dtype": "F32", "shape": shape, "data_offsets": [start]},
            {"dtype": "F32", "shape": "x", "data_offsets": ["a", None]},
        ])) if draw(st.booleans()) else draw(JSON_VALUES)
        offset = start + size
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.dictionaries(st.sampled_from(["format", "e2p.time_embedding", "prompt"])
                                                       | st.text(max_size=3), JSON_SCALARS | st.text(max_size=8),
                                                       max_size=3) | JSON_VALUES)
    header = json.dumps(entries).encode() if draw(st.booleans()) else draw(st.binary(max_size=40))
    data = draw(st.binary(min_size=0, max_size=offset + 8))
    length = len(header)
    if kind == "length":
        length = draw(st.sampled_from([0, 1, length - 1, length + 1, 2**63, 2**64 - 1, len(header) + len(data)]))
    blob = struct.pack("<Q", max(0, min(length, 2**64 - 1))) + header + data
    if kind == "truncated":
        blob = blob[:draw(st.integers(0, len(blob)))]
    return blob


@st.composite
def damaged(draw, blob: bytes) -> bytes:
    """``blob`` (a valid file) truncated, with a few bytes overwritten, or both."""
    data = bytearray(blob[:draw(st.integers(0, len(blob)))] if draw(st.booleans()) else blob)
    for _ in range(draw(st.integers(0 if len(data) < len(blob) else 1, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)
