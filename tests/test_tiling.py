"""High-resolution tiling (e2p_core.tiling): the merge with a stand-in perceiver whose truth is known, and the real
pipeline on the tiny model at an odd 4K-like size.

The stand-in reads the truth from the image it is given (channel 0 holds the true sqrt-depth in [0,1]): the global
pass sees it at a low processing size (detail lost), every tile returns its own crop under its own random scale and
shift plus noise, as Edit2Perceive's affine-invariant depth would.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.alignment import align_scale_shift
from e2p_core.pipeline import PointPrompt, perceive
from e2p_core.tiling import auto_tiles, perceive_tiled, plan_tiles
from e2p_core.prompts import load_prompt_embeddings

PROCESSING_SIDE = 48


def stand_in(rng: np.random.Generator, noise: float, affine: bool):
    def perceiver(image, points, point_map):
        truth = torch.from_numpy(np.asarray(image[..., 0], dtype=np.float64))[None]  # [1,h,w]
        height, width = truth.shape[-2:]
        if max(height, width) > PROCESSING_SIDE:  # as the model: only the processing size survives
            scale = PROCESSING_SIDE / max(height, width)
            small = F.interpolate(truth[None], scale_factor=scale, mode="area")
            truth = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)[0]
        a, b = (np.exp(rng.uniform(-0.25, 0.25)), rng.uniform(-0.1, 0.1)) if affine else (1.0, 0.0)
        prediction = a * (truth - 0.5) + 0.5 + b + noise * torch.from_numpy(rng.normal(size=truth.shape))
        return prediction.clamp(0, 1).float()
    return perceiver


def abs_rel(prediction: torch.Tensor, sqrt_depth: torch.Tensor) -> float:
    """AbsRel of depth after one least-squares alignment in sqrt space (as the evaluation does)."""
    aligned = align_scale_shift(prediction.double().reshape(1, -1), sqrt_depth.reshape(1, -1))[0]
    depth, true_depth = aligned.clamp_min(1e-3) ** 2, sqrt_depth.reshape(-1) ** 2
    return float(((depth - true_depth).abs() / true_depth).mean())


def as_image(truth01: torch.Tensor) -> np.ndarray:
    return truth01.numpy()[..., None].repeat(3, axis=-1).astype(np.float32)


def detailed_truth(hw) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.linspace(0, 1, hw[0], dtype=torch.float64),
                                torch.linspace(0, 1, hw[1], dtype=torch.float64), indexing="ij")
    return 0.5 + 0.25 * torch.sin(6 * cols + 2 * rows) + 0.1 * torch.sin(60 * cols) * torch.cos(50 * rows)


def test_aligned_tiles_are_as_accurate_as_the_noise_alone():
    hw, tiles = (150, 230), 4
    truth = detailed_truth(hw)
    sqrt_depth = 1 + truth  # any affine of the map is a valid sqrt-depth
    merged = perceive_tiled(stand_in(np.random.default_rng(0), 0.01, affine=True), as_image(truth), "depth", tiles)
    noise_only = perceive_tiled(stand_in(np.random.default_rng(0), 0.01, affine=False), as_image(truth), "depth",
                                tiles)
    global_only = perceive_tiled(stand_in(np.random.default_rng(0), 0.01, affine=False), as_image(truth), "depth", 0)
    assert merged.shape == (1, *hw)
    assert abs_rel(merged[0], sqrt_depth) <= 1.1 * abs_rel(noise_only[0], sqrt_depth)
    assert abs_rel(merged[0], sqrt_depth) < 0.7 * abs_rel(global_only[0], sqrt_depth)  # tiling brought the detail


def test_no_seam_on_a_smooth_truth():
    hw, tiles = (160, 240), 3
    rows, cols = torch.meshgrid(torch.linspace(0, 1, hw[0], dtype=torch.float64),
                                torch.linspace(0, 1, hw[1], dtype=torch.float64), indexing="ij")
    truth = 0.2 + 0.5 * cols + 0.2 * rows ** 2
    merged = perceive_tiled(stand_in(np.random.default_rng(1), 0.0, affine=True), as_image(truth), "depth",
                            tiles)[0].double()
    gradient = torch.zeros(hw, dtype=torch.float64)
    gradient[:-1, :-1] = torch.hypot(merged[1:, :-1] - merged[:-1, :-1], merged[:-1, 1:] - merged[:-1, :-1])
    border = torch.zeros(hw, dtype=torch.bool)
    for tile in plan_tiles(hw, tiles):
        for row in (tile.top, tile.top + tile.height - 1):
            if 0 < row < hw[0] - 1:
                border[row, tile.left:tile.left + tile.width] = True
        for col in (tile.left, tile.left + tile.width - 1):
            if 0 < col < hw[1] - 1:
                border[tile.top:tile.top + tile.height, col] = True
    border[-1, :] = border[:, -1] = False
    interior = ~border
    interior[-1, :] = interior[:, -1] = False
    assert border.any()
    assert gradient[border].mean() <= 1.5 * gradient[interior].mean(), (gradient[border].mean(),
                                                                         gradient[interior].mean())


def test_normals_are_blended_as_unit_vectors_and_mattes_get_the_clicks_in_tile_pixels():
    hw = (90, 130)
    seen_clicks = []

    def normals(image, points, point_map):
        out = torch.zeros(3, *image.shape[:2])
        out[2] = 1
        out[0] = float(image.shape[1]) / 200  # tiles disagree: the blend must be renormalised
        return out / out.norm(dim=0, keepdim=True)

    merged = perceive_tiled(normals, np.zeros((*hw, 3), np.float32), "normal", 3)
    torch.testing.assert_close(merged.norm(dim=0), torch.ones(hw), atol=1e-5, rtol=0)

    def matte(image, points, point_map):
        seen_clicks.append(points.points_px.copy())
        return torch.full((1, *image.shape[:2]), 0.5)

    click = np.array([[100.0, 40.0]])
    plan = plan_tiles(hw, 3)
    perceive_tiled(matte, np.zeros((*hw, 3), np.float32), "matting", 3, points=PointPrompt(click))
    assert len(seen_clicks) == 1 + len(plan)
    np.testing.assert_array_equal(seen_clicks[0], click)
    for tile, clicks in zip(plan, seen_clicks[1:]):
        np.testing.assert_array_equal(clicks, click - [tile.left, tile.top])


def test_tile_plan_covers_the_image_and_counts_dit_calls():
    assert plan_tiles((100, 100), 1) == [] and auto_tiles((700, 768), 768) == 0
    for hw, tiles in [((2161, 3839), 3), ((217, 385), 5), ((385, 217), 2)]:
        plan = plan_tiles(hw, tiles)
        covered = np.zeros(hw, bool)
        for tile in plan:
            covered[tile.slices] = True
            assert tile.top + tile.height <= hw[0] and tile.left + tile.width <= hw[1]
        assert covered.all()
    assert auto_tiles((2160, 3840), 768) == 7  # 768 px tiles with a quarter overlap over 4K


@pytest.fixture(scope="module")
def tiny_models():
    from e2p_core.backends.diffusers_backend import load_diffusers_backend
    from e2p_core.weights import load_dit, load_vae

    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    return load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32, "cpu")


@pytest.mark.parametrize("task", ["depth", "normal"])
def test_real_pipeline_at_an_odd_4k_like_size_returns_exactly_h_x_w(tiny_models, prompt_files, task):
    denoiser, codec = tiny_models
    prompt = load_prompt_embeddings(prompt_files[task])
    hw = (2161, 3839)
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    calls = []

    def perceiver(frame, points, point_map):
        calls.append(frame.shape[:2])
        return perceive(denoiser, codec, frame, task, prompt, resolution=64).output[0]

    merged = perceive_tiled(perceiver, image, task, 2)
    assert merged.shape == ((3 if task == "normal" else 1), *hw)
    assert torch.isfinite(merged).all()
    assert len(calls) == 1 + len(plan_tiles(hw, 2)) and calls[0] == hw


class CountingCodec:
    """The tiny VAE, counting the frames it encodes."""

    def __init__(self, codec):
        self.codec, self.dtype, self.device, self.encoded_frames = codec, codec.dtype, codec.device, 0

    def encode(self, pixels):
        self.encoded_frames += pixels.shape[0]
        return self.codec.encode(pixels)

    def decode(self, latents):
        return self.codec.decode(latents)


def test_one_rgb_encode_serves_every_task(tiny_models, prompt_files):
    from e2p_core.pipeline import encode_image

    denoiser, codec = tiny_models
    counting = CountingCodec(codec)
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    shared = encode_image(counting, images, resolution=64)
    assert counting.encoded_frames == 2
    for task in ("depth", "normal", "matting"):
        prompt = load_prompt_embeddings(prompt_files[task])
        point_map = np.zeros((40, 56), np.float32) if task == "matting" else None
        reused = perceive(denoiser, counting, images, task, prompt, resolution=64, encoded=shared,
                          point_map=point_map)
        own = perceive(denoiser, codec, images, task, prompt, resolution=64, point_map=point_map)
        torch.testing.assert_close(reused.output, own.output, atol=0, rtol=0)
    assert counting.encoded_frames == 2 + 2  # the RGB once for all tasks; matting's point map is its own context
    with pytest.raises(Exception, match="was not made from"):
        perceive(denoiser, counting, images, "depth", load_prompt_embeddings(prompt_files["depth"]), resolution=96,
                 encoded=shared)
