"""Parity with the official Edit2Perceive code: every run of tests/fixtures/e2p_tiny, through the Python API and
the CLI, from the DiffSynth and the BFL copies of the weights, with and without the LoRA.

Tolerances are the fixtures README's: float32 atol 1e-5 (unit normals 5e-5; the official code itself varies by
2e-6 with the thread count), bf16 0.07 on velocities/latents, 0.05 on decoded, 0.02 on postprocessed outputs --
which a missing bf16 time-frequency quirk (0.67 / 0.26 / 0.12) must fail, as tested below.
"""

import numpy as np
import pytest
import torch

from conftest import FIXTURES, MANIFEST, PARITY_DEVICE, TINY_DIT_CONFIG, load_run
from e2p_core.backends.diffusers_backend import load_diffusers_backend
from e2p_core.cli import main
from e2p_core.images import load_image_rgb, plan_geometry, prepare_image
from e2p_core.pipeline import PointPrompt, perceive
from e2p_core.points import encode_point_map
from e2p_core.prompts import load_prompt_embeddings
from e2p_core.tokens import CONTEXT_INDEX, TARGET_INDEX, pack_latents, position_ids
from e2p_core.weights import load_dit, load_vae

RUNS = sorted(MANIFEST["runs"])
DIT_FILES = ("dit_diffsynth.safetensors", "dit_bfl.safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCES = {  # (velocity & latent, decoded, output)
    torch.float32: (1e-5, 1e-5, 1e-5),
    torch.bfloat16: (0.07, 0.05, 0.02),
}
NORMAL_OUTPUT_ATOL_FP32 = 5e-5


def run_settings(name: str) -> dict:
    info = MANIFEST["runs"][name]
    square = "square" in name
    return {
        "task": info["task"], "steps": info["steps"], "dtype": DTYPES[info["dtype"]], "lora": info["lora"],
        "resize": "reference" if square else "aligned",
        "resolution": int(name.rsplit("square", 1)[1]) if square else "native",
    }


def models(dit_file: str, dtype: torch.dtype, lora: bool):
    loras = [(FIXTURES / "lora_kohya.safetensors", 1.0)] if lora else []
    dit = load_dit(FIXTURES / dit_file, TINY_DIT_CONFIG, loras)
    # 'reference' by name: the official code rounds the frequencies to the compute dtype (exact in float32), whereas
    # 'auto' on weights that record nothing means bf16, how the released weights were trained.
    return load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), dtype, PARITY_DEVICE,
                                  time_embedding="reference")


def reference_output(run: dict, task: str) -> torch.Tensor:
    """The fixture's postprocessed map in our layout: [1,3,H,W] normals, [1,1,H,W] channel-mean depth/alpha."""
    post = run["post_np"].permute(2, 0, 1)[None]
    return post if task == "normal" else post.mean(dim=1, keepdim=True)


def assert_stages(result_tensors: dict, run: dict, task: str, dtype: torch.dtype) -> None:
    atol_latent, atol_decoded, atol_output = TOLERANCES[dtype]
    if dtype == torch.float32 and task == "normal":
        atol_output = NORMAL_OUTPUT_ATOL_FP32
    result_tensors = {key: value.cpu() for key, value in result_tensors.items()}
    torch.testing.assert_close(result_tensors["velocity"], run["velocity_first_step"], atol=atol_latent, rtol=0)
    torch.testing.assert_close(result_tensors["latent"], run["final_latent"], atol=atol_latent, rtol=0)
    torch.testing.assert_close(result_tensors["decoded"], run["decoded_raw"], atol=atol_decoded, rtol=0)
    torch.testing.assert_close(result_tensors["output"], reference_output(run, task), atol=atol_output, rtol=0)


@pytest.mark.parametrize("dit_file", DIT_FILES)
@pytest.mark.parametrize("name", RUNS)
def test_python_api_matches_official_run(name, dit_file, inputs_npz, prompt_files):
    settings = run_settings(name)
    run = load_run(name)
    denoiser, codec = models(dit_file, settings["dtype"], settings["lora"])
    prompt = load_prompt_embeddings(prompt_files[settings["task"]]).to(PARITY_DEVICE, settings["dtype"])
    image = load_image_rgb(FIXTURES / "input.png")
    point_map = inputs_npz["point_mask"] if settings["task"] == "matting" else None
    with torch.no_grad():
        result = perceive(denoiser, codec, image, settings["task"], prompt, point_map=point_map,
                          steps=settings["steps"], noise=run["noise"].float(), resize=settings["resize"],
                          resolution=settings["resolution"])
    tensors = {"velocity": result.velocity, "latent": result.latent, "decoded": result.decoded,
               "output": result.postprocessed}
    assert_stages(tensors, run, settings["task"], settings["dtype"])
    assert result.output.shape[-2:] == image.shape[:2]
    if result.geometry.resized_hw == image.shape[:2]:  # nothing to restore: the user's output is the reference's
        assert torch.equal(result.output, result.postprocessed)


@pytest.mark.parametrize("name", ["depth_1step_fp32", "matting_1step_fp32", "depth_4step_bf16"])
def test_context_encoding_and_token_layout(name):
    """Stage by stage before the DiT: context pixels, VAE latents, packed tokens and RoPE ids."""
    settings = run_settings(name)
    run = load_run(name)
    dtype = settings["dtype"]
    _, codec = models("dit_bfl.safetensors", dtype, lora=False)
    geometry = plan_geometry((48, 64), settings["resize"], settings["resolution"])
    pixels = [prepare_image(load_image_rgb(FIXTURES / "input.png"), geometry)[None].to(dtype)]
    if settings["task"] == "matting":
        pixels.append(encode_point_map(np.load(FIXTURES / "inputs.npz")["point_mask"])[None].to(dtype))
    with torch.no_grad():
        latents = [codec.encode(p.to(PARITY_DEVICE)).cpu() for p in pixels]
    atol = TOLERANCES[dtype][0]
    for i, (p, latent) in enumerate(zip(pixels, latents)):
        assert torch.equal(p, run[f"context{i}_pixels"])
        torch.testing.assert_close(latent, run[f"context{i}_latent"], atol=atol, rtol=0)
    tokens = torch.cat([pack_latents(latent) for latent in latents], dim=1)
    torch.testing.assert_close(tokens, run["context_tokens_packed"], atol=atol, rtol=0)
    hw = tuple(latents[0].shape[-2:])
    assert torch.equal(position_ids(hw, TARGET_INDEX, dtype)[None], run["target_ids"])
    assert torch.equal(position_ids(hw, CONTEXT_INDEX, dtype).repeat(len(latents), 1)[None], run["context_ids"])


def test_bf16_needs_the_time_frequency_quirk(prompt_files):
    """Without the reference's bf16 frequency rounding the bf16 run is far outside the tolerance."""
    run = load_run("depth_1step_bf16")
    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    vae = load_vae(FIXTURES / "vae_bfl.safetensors")
    prompt = load_prompt_embeddings(prompt_files["depth"]).to("cpu", torch.bfloat16)
    image = load_image_rgb(FIXTURES / "input.png")
    velocities = {}
    for variant in ("reference", "exact"):
        denoiser, codec = load_diffusers_backend(dit, vae, torch.bfloat16, "cpu", time_embedding=variant)
        with torch.no_grad():
            result = perceive(denoiser, codec, image, "depth", prompt, noise=run["noise"].float(), resolution="native")
        velocities[variant] = (result.velocity.float() - run["velocity_first_step"].float()).abs().max().item()
    assert velocities["reference"] <= TOLERANCES[torch.bfloat16][0]
    assert velocities["exact"] > 0.3


def test_matting_from_clicks_reproduces_the_app_point_map(inputs_npz, prompt_files):
    """Clicks -> disks -> 10 seed-42 Gaussians, as app.py, at the fixture's 8 px radius and 3 px sigma."""
    run = load_run("matting_1step_fp32")
    denoiser, codec = models("dit_bfl.safetensors", torch.float32, lora=False)
    prompt = load_prompt_embeddings(prompt_files["matting"])
    clicks = PointPrompt(inputs_npz["clicks_xy"].astype(np.float64), mode="app", sigma_px=3, radius_px=8)
    with torch.no_grad():
        result = perceive(denoiser, codec, load_image_rgb(FIXTURES / "input.png"), "matting", prompt, points=clicks,
                          noise=run["noise"], resolution="native")
    assert torch.equal(result.point_map[0], torch.from_numpy(inputs_npz["point_mask"]))
    torch.testing.assert_close(result.output, reference_output(run, "matting"), atol=1e-5, rtol=0)


def test_matting_from_a_mask_samples_points_like_training(inputs_npz, prompt_files):
    """A user mask -> 10 seed-42 points where mask > 0.8: with the disks as the mask, the app's point map again."""
    run = load_run("matting_1step_fp32")
    denoiser, codec = models("dit_bfl.safetensors", torch.float32, lora=False)
    mask = PointPrompt(mask=inputs_npz["click_disk_alpha"], mode="mask", sigma_px=3)
    with torch.no_grad():
        result = perceive(denoiser, codec, load_image_rgb(FIXTURES / "input.png"), "matting",
                          load_prompt_embeddings(prompt_files["matting"]), points=mask, noise=run["noise"],
                          resolution="native")
    assert torch.equal(result.point_map[0], torch.from_numpy(inputs_npz["point_mask"]))
    torch.testing.assert_close(result.output, reference_output(run, "matting"), atol=1e-5, rtol=0)


def cli_args(name: str, dit_file: str, tmp_path, prompt_files, dit_config_file) -> list[str]:
    settings = run_settings(name)
    noise_file = tmp_path / "noise.safetensors"
    from safetensors.torch import save_file

    save_file({"noise": load_run(name)["noise"].float().contiguous()}, noise_file)
    args = ["predict", "--task", settings["task"], "--dit", str(FIXTURES / dit_file), "--dit-config",
            str(dit_config_file), "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds",
            str(prompt_files[settings["task"]]), "--image", str(FIXTURES / "input.png"), "--out",
            str(tmp_path / "out.png"), "--raw", str(tmp_path / "raw.safetensors"), "--steps", str(settings["steps"]),
            "--noise", str(noise_file), "--resize", settings["resize"], "--resolution", str(settings["resolution"]),
            "--dtype", {torch.float32: "fp32", torch.bfloat16: "bf16"}[settings["dtype"]], "--device", PARITY_DEVICE,
            "--time-embedding", "reference"]
    if settings["lora"]:
        args += ["--lora", str(FIXTURES / "lora_kohya.safetensors")]
    if settings["task"] == "matting":
        point_map = tmp_path / "point_map.safetensors"
        save_file({"point_map": torch.from_numpy(np.load(FIXTURES / "inputs.npz")["point_mask"])}, point_map)
        args += ["--point-map", str(point_map)]
    return args


@pytest.mark.parametrize("dit_file", DIT_FILES)
@pytest.mark.parametrize("name", RUNS)
def test_cli_raw_outputs_match_official_run(name, dit_file, tmp_path, prompt_files, dit_config_file):
    from safetensors.torch import load_file

    assert main(cli_args(name, dit_file, tmp_path, prompt_files, dit_config_file)) == 0
    raw = load_file(tmp_path / "raw.safetensors")
    settings = run_settings(name)
    assert_stages(raw, load_run(name), settings["task"], settings["dtype"])
    assert (tmp_path / "out.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("prompt_flags", ["points", "point_mask"])
def test_cli_matting_from_clicks_or_mask(prompt_flags, tmp_path, inputs_npz, prompt_files, dit_config_file):
    """--points (KJNodes JSON) and --point-mask give the official app's point map and output."""
    from PIL import Image
    from safetensors.torch import load_file

    args = cli_args("matting_1step_fp32", "dit_bfl.safetensors", tmp_path, prompt_files, dit_config_file)
    args = args[: args.index("--point-map")]
    if prompt_flags == "points":
        clicks = [{"x": int(x), "y": int(y)} for x, y in inputs_npz["clicks_xy"]]
        args += ["--points", str(clicks), "--points-space", "pixels", "--point-radius", "8"]
    else:
        Image.fromarray((inputs_npz["click_disk_alpha"] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
        args += ["--point-mask", str(tmp_path / "mask.png")]
    assert main([*args, "--point-sigma", "3"]) == 0
    raw = load_file(tmp_path / "raw.safetensors")
    assert torch.equal(raw["point_map"][0], torch.from_numpy(inputs_npz["point_mask"]))
    torch.testing.assert_close(raw["output"], reference_output(load_run("matting_1step_fp32"), "matting"),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["depth", "normal"])
def test_cli_view_files_hold_the_output_in_the_user_conventions(task, tmp_path, prompt_files, dit_config_file):
    """--out .npy holds the float map and .png its quantised picture: depth as the near-white hint, normals as
    ControlNet-BAE RGB; both are computed from the raw output (the reference conventions) by hand here."""
    from PIL import Image
    from safetensors.torch import load_file

    name = f"{task}_1step_fp32"
    args = cli_args(name, "dit_bfl.safetensors", tmp_path, prompt_files, dit_config_file)
    assert main(args) == 0
    png = np.asarray(Image.open(tmp_path / "out.png"))
    args[args.index("--out") + 1] = str(tmp_path / "out.npy")
    assert main(args) == 0
    view = np.load(tmp_path / "out.npy")
    raw_output = load_file(tmp_path / "raw.safetensors")["output"]
    assert raw_output.shape[-2:] == view.shape[:2] == png.shape[:2]  # processing grid = input size at native 64px
    if task == "depth":
        np.testing.assert_allclose(view, 1 - raw_output[0, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(png / 65535, view, atol=1 / 65535)
    else:
        np.testing.assert_allclose(view, raw_output[0].permute(1, 2, 0).numpy(), atol=1e-6)
        np.testing.assert_allclose(png / 255, (view + 1) / 2, atol=1 / 255)
