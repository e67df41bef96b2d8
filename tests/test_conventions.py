"""Output conventions on a synthetic scene whose geometry is known exactly: a sphere in front of a wall, rendered
analytically with a pinhole camera.

The chain under test is the one the model was trained on (E2P-SPEC §4.4-§4.5): camera normals in the OpenGL frame
with x negated (the training targets), and depth as p2/p98-normalised sqrt depth with near = -1, which the reference
postprocessing maps to [0,1] with near = 0.
"""

import numpy as np
import pytest
import torch

from e2p_core.conventions import (
    depth_hint,
    normalize_depth,
    normals_from_convention,
    normals_to_convention,
    normals_to_rgb01,
)
from e2p_core.errors import InputError

SIZE = 96
FOCAL = 100.0
SPHERE_CENTER = np.array([0.0, 0.0, 4.0])  # OpenCV camera frame: +x right, +y down, +z forward
SPHERE_RADIUS = 1.2
WALL_Z = 7.0


def render_scene():
    """Per pixel: depth (metres along z) and the unit normal in the OpenGL camera frame (+x right, +y up, +z back)."""
    v, u = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    rays = np.stack([(u - SIZE / 2) / FOCAL, (v - SIZE / 2) / FOCAL, np.ones_like(u)], axis=-1)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)
    # Ray-sphere intersection: |t*r - c|^2 = R^2.
    b = rays @ SPHERE_CENTER
    disc = b**2 - (SPHERE_CENTER @ SPHERE_CENTER - SPHERE_RADIUS**2)
    hit = disc > 0
    t_sphere = np.where(hit, b - np.sqrt(np.clip(disc, 0, None)), np.inf)
    t_wall = WALL_Z / rays[..., 2]
    on_sphere = t_sphere < t_wall
    points = rays * np.where(on_sphere, t_sphere, t_wall)[..., None]
    normals_cv = np.where(on_sphere[..., None], (points - SPHERE_CENTER) / SPHERE_RADIUS, np.array([0.0, 0.0, -1.0]))
    normals_gl = normals_cv * np.array([1.0, -1.0, -1.0])
    return points[..., 2], normals_gl, on_sphere


def to_model_layout(array_hwc) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array_hwc, dtype=np.float32)).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def scene():
    depth, normals_gl, on_sphere = render_scene()
    # The E2P training target: Hypersim's OpenGL-camera normals with the x channel negated.
    normals_e2p = to_model_layout(normals_gl * np.array([-1.0, 1.0, 1.0]))
    return depth, normals_gl, normals_e2p, on_sphere


# Probe pixels (row, col): the sphere's left and right limbs, its top and bottom, its centre, and the wall.
CENTER = (SIZE // 2, SIZE // 2)
LEFT, RIGHT = (SIZE // 2, SIZE // 2 - 28), (SIZE // 2, SIZE // 2 + 28)
TOP, BOTTOM = (SIZE // 2 - 28, SIZE // 2), (SIZE // 2 + 28, SIZE // 2)
WALL = (3, 3)


def rgb_at(rgb: torch.Tensor, pixel) -> np.ndarray:
    return rgb[0, :, pixel[0], pixel[1]].numpy()


def test_probe_pixels_hit_what_they_should(scene):
    _, _, _, on_sphere = scene
    assert all(on_sphere[p] for p in (CENTER, LEFT, RIGHT, TOP, BOTTOM)) and not on_sphere[WALL]


def test_controlnet_bae_is_x_left_y_up_z_toward_camera(scene):
    _, _, normals_e2p, _ = scene
    rgb = normals_to_rgb01(normals_to_convention(normals_e2p, "controlnet_bae"))
    assert rgb_at(rgb, LEFT)[0] > 0.75 and rgb_at(rgb, RIGHT)[0] < 0.25  # left-facing surfaces are red
    assert rgb_at(rgb, TOP)[1] > 0.75 and rgb_at(rgb, BOTTOM)[1] < 0.25  # up-facing surfaces are green
    np.testing.assert_allclose(rgb_at(rgb, WALL), [0.5, 0.5, 1.0], atol=1e-6)  # the lavender of facing walls
    assert rgb_at(rgb, CENTER)[2] > 0.99


def test_opengl_is_x_right_y_up(scene):
    _, normals_gl, normals_e2p, _ = scene
    converted = normals_to_convention(normals_e2p, "opengl")
    torch.testing.assert_close(converted, to_model_layout(normals_gl))
    rgb = normals_to_rgb01(converted)
    assert rgb_at(rgb, RIGHT)[0] > 0.75 and rgb_at(rgb, TOP)[1] > 0.75


def test_directx_is_x_right_y_down(scene):
    _, _, normals_e2p, _ = scene
    rgb = normals_to_rgb01(normals_to_convention(normals_e2p, "directx"))
    assert rgb_at(rgb, RIGHT)[0] > 0.75 and rgb_at(rgb, BOTTOM)[1] > 0.75 and rgb_at(rgb, TOP)[1] < 0.25


@pytest.mark.parametrize("convention", ["controlnet_bae", "opengl", "directx"])
def test_conventions_invert_and_keep_unit_length(scene, convention):
    _, _, normals_e2p, _ = scene
    converted = normals_to_convention(normals_e2p, convention)
    torch.testing.assert_close(converted.norm(dim=1), torch.ones(1, SIZE, SIZE))
    torch.testing.assert_close(normals_from_convention(converted, convention), normals_e2p)


def test_unknown_convention_is_rejected(scene):
    with pytest.raises(InputError, match="normal convention"):
        normals_to_convention(scene[2], "blender")


def test_depth_polarity(scene):
    depth, _, _, on_sphere = scene
    # The training target: sqrt depth, p2/p98 -> [-1,1] with near = -1; the reference output maps it to [0,1].
    sqrt_depth = np.sqrt(depth + 1e-6)
    p2, p98 = np.percentile(sqrt_depth, (2, 98))
    target = np.clip(((sqrt_depth - p2) / (p98 - p2) - 0.5) * 2, -1, 1)
    depth_affine01 = torch.from_numpy((target + 1) / 2).float()[None, None]
    hint = depth_hint(depth_affine01, "near_white")[0, 0]
    assert hint[CENTER] == hint.max() and hint[WALL] == hint.min()  # nearest point brightest, the wall darkest
    as_predicted = depth_hint(depth_affine01, "near_black")[0, 0]
    assert as_predicted[CENTER] == as_predicted.min() and torch.equal(as_predicted, depth_affine01[0, 0])
    assert hint[LEFT] < hint[CENTER]  # the limb is farther than the centre


def test_depth_normalization_modes():
    frames = torch.stack([torch.linspace(0.2, 0.4, 100).view(1, 10, 10), torch.linspace(0.3, 0.9, 100).view(1, 10, 10)])
    minmax = normalize_depth(frames, "minmax")
    assert torch.allclose(minmax.amin(dim=(1, 2, 3)), torch.zeros(2)) and torch.allclose(minmax.amax(dim=(1, 2, 3)),
                                                                                         torch.ones(2))
    sequence = normalize_depth(frames, "sequence")  # one range for the whole clip: frame 0 stays darker
    assert sequence.min() == 0 and sequence.max() == 1 and sequence[0].max() < sequence[1].max()
    torch.testing.assert_close(sequence[0, 0, 0, 0], torch.tensor(0.0))
    torch.testing.assert_close(sequence[0, 0, -1, -1], torch.tensor((0.4 - 0.2) / (0.9 - 0.2)))
    percentile = normalize_depth(frames, "percentile")
    assert percentile.min() == 0 and percentile.max() == 1 and (percentile == 0).sum() > 2  # the tails are clipped
    assert torch.equal(normalize_depth(frames, "none"), frames)
    with pytest.raises(InputError):
        normalize_depth(frames, "global")
