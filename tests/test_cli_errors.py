"""Bad input through the CLI: a clear message naming the problem, exit status 2, and nothing written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from e2p_core.cli import main

BASE_ARGS = {
    "--task": "depth",
    "--dit": str(FIXTURES / "dit_bfl.safetensors"),
    "--vae": str(FIXTURES / "vae_bfl.safetensors"),
    "--image": str(FIXTURES / "input.png"),
    "--resolution": "native",
    "--dtype": "fp32",
    "--device": "cpu",
}


def run_cli(tmp_path, prompt_files, dit_config_file, **overrides) -> tuple[int, list[str]]:
    """Run ``predict`` with the fixture setup plus ``overrides`` (``--flag``: value, None drops it)."""
    args = {**BASE_ARGS, "--dit-config": str(dit_config_file), "--prompt-embeds": str(prompt_files["depth"]),
            "--out": str(tmp_path / "out" / "map.png"), "--raw": str(tmp_path / "out" / "raw.safetensors")}
    args.update({key.replace("_", "-"): value for key, value in overrides.items()})
    argv = ["predict"] + [item for key, value in args.items() if value is not None for item in (key, value)]
    status = main(argv)
    written = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    return status, written


def expect_error(capsys, tmp_path, prompt_files, dit_config_file, *fragments, **overrides):
    status, written = run_cli(tmp_path, prompt_files, dit_config_file, **overrides)
    message = capsys.readouterr().err
    assert status == 2, message
    assert written == [], f"files written despite the error: {written}"
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message


def write_bad_dit(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, path)
    return str(path)


def test_pickle_checkpoint_is_refused_without_running_it(capsys, tmp_path, prompt_files, dit_config_file):
    pickled = tmp_path / "dit.safetensors"
    torch.save(load_file(FIXTURES / "dit_bfl.safetensors"), pickled)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "pickle", __dit=str(pickled))


def test_truncated_checkpoint(capsys, tmp_path, prompt_files, dit_config_file):
    data = (FIXTURES / "dit_bfl.safetensors").read_bytes()
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "dit.safetensors",
                 __dit=write_bad_dit(tmp_path, "dit.safetensors", data[: len(data) // 2]))


def test_missing_checkpoint_names_file_and_folder(capsys, tmp_path, prompt_files, dit_config_file):
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "nowhere.safetensors", str(tmp_path),
                 __dit=str(tmp_path / "nowhere.safetensors"))


def test_vae_given_as_dit(capsys, tmp_path, prompt_files, dit_config_file):
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "vae", __dit=str(FIXTURES / "vae_bfl.safetensors"))


def test_mixed_key_styles(capsys, tmp_path, prompt_files, dit_config_file):
    bfl, diffsynth = load_file(FIXTURES / "dit_bfl.safetensors"), load_file(FIXTURES / "dit_diffsynth.safetensors")
    mixed = {k: v for k, v in bfl.items() if not k.startswith("single_blocks")}
    mixed.update({k: v for k, v in diffsynth.items() if k.startswith("single_blocks")})
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "mixes",
                 __dit=write_bad_dit(tmp_path, "mixed.safetensors", mixed))


def test_lora_for_another_base(capsys, tmp_path, prompt_files, dit_config_file):
    lora = load_file(FIXTURES / "lora_kohya.safetensors")
    key = "lora_unet_double_blocks_0_img_attn_proj"
    lora[f"{key}.lora_down.weight"] = torch.zeros(4, 3072)  # a full-size FLUX LoRA module on the tiny base
    lora[f"{key}.lora_up.weight"] = torch.zeros(3072, 4)
    path = tmp_path / "other_lora.safetensors"
    save_file(lora, path)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "another base", __lora=str(path))


def test_tiny_dit_without_config_asks_for_axes(capsys, tmp_path, prompt_files, dit_config_file):
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "axes_dims_rope", __dit_config=None)


@pytest.mark.parametrize("size", [(1, 1), (20000, 16)])
def test_images_too_small_or_too_large(capsys, tmp_path, prompt_files, dit_config_file, size):
    path = tmp_path / "image.png"
    Image.new("RGB", size).save(path)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, f"{size[0]}x{size[1]}", __image=str(path))


def test_native_resolution_beyond_exact_position_ids(capsys, tmp_path, prompt_files, dit_config_file):
    path = tmp_path / "wide.png"
    Image.new("RGB", (5000, 16)).save(path)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "4096", __image=str(path))


def test_not_an_image(capsys, tmp_path, prompt_files, dit_config_file):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "notes.png", __image=str(path))


@pytest.mark.parametrize("points, fragment", [
    ('[{"x": 10, "y": ', "json"),
    ('[{"x": 10}]', "y"),
    ('[{"x": 900, "y": 10}]', "outside"),
    ('[{"x": NaN, "y": 10}]', "nan"),
])
def test_bad_points(capsys, tmp_path, prompt_files, dit_config_file, points, fragment):
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, fragment, __task="matting",
                 __prompt_embeds=str(prompt_files["matting"]), __points=points)


def test_output_paths_are_checked_before_any_work(capsys, tmp_path, prompt_files, dit_config_file):
    (tmp_path / "out" / "raw.safetensors").mkdir(parents=True)
    status, _ = run_cli(tmp_path, prompt_files, dit_config_file)
    assert status == 2 and "is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["raw.safetensors"]  # the folder, nothing else
    expect_error(capsys, tmp_path / "jpg", prompt_files, dit_config_file, ".png or .npy",
                 __out=str(tmp_path / "jpg" / "out" / "map.jpg"))


def test_nan_noise_and_wrong_noise_shape(capsys, tmp_path, prompt_files, dit_config_file):
    nan_noise = tmp_path / "nan.safetensors"
    save_file({"noise": torch.full((1, 16, 6, 8), float("nan"))}, nan_noise)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "nan", __noise=str(nan_noise))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"noise": torch.zeros(1, 16, 8, 8)}, wrong)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "[1,16,6,8]", __noise=str(wrong))


def test_nan_prompt_embeddings(capsys, tmp_path, prompt_files, dit_config_file):
    path = tmp_path / "nan_prompt.safetensors"
    save_file({"prompt_embeds": torch.full((1, 512, 32), float("nan")), "pooled_prompt_embeds": torch.zeros(1, 32)},
              path)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "nan", __prompt_embeds=str(path))


def test_point_map_of_another_size(capsys, tmp_path, prompt_files, dit_config_file):
    path = tmp_path / "map.safetensors"
    save_file({"point_map": torch.zeros(10, 10)}, path)
    expect_error(capsys, tmp_path, prompt_files, dit_config_file, "10x10", __task="matting",
                 __prompt_embeds=str(prompt_files["matting"]), __point_map=str(path))


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_rgba_and_grayscale_images_run_like_their_rgb_conversion(tmp_path, prompt_files, dit_config_file, mode):
    """The reference reads every image with .convert("RGB"); so do we (RGBA's alpha is dropped with a warning)."""
    rgb = Image.open(FIXTURES / "input.png").convert("RGB")
    converted = rgb.convert(mode)
    if mode == "RGBA":
        converted.putalpha(Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))))
    converted.save(tmp_path / "in.png")
    converted.convert("RGB").save(tmp_path / "in_rgb.png")
    outputs = []
    for name in ("in.png", "in_rgb.png"):
        run_dir = tmp_path / f"run_{name}"
        status, _ = run_cli(run_dir, prompt_files, dit_config_file, __image=str(tmp_path / name),
                            __noise=None)
        assert status == 0
        outputs.append(load_file(run_dir / "out" / "raw.safetensors")["output"])
    assert torch.equal(outputs[0], outputs[1])


def test_successful_run_records_its_settings(tmp_path, prompt_files, dit_config_file):
    status, written = run_cli(tmp_path, prompt_files, dit_config_file)
    assert status == 0 and written == ["map.png", "raw.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "raw.safetensors"), "pt") as handle:
        recorded = json.loads(handle.metadata()["e2p.args"])
    assert recorded["task"] == "depth" and recorded["steps"] == 1 and recorded["seed"] == 42
    with Image.open(tmp_path / "out" / "map.png") as png:
        assert png.size == (64, 48) and png.mode.startswith("I")  # 16-bit grayscale
