"""The DiT memory modes of the diffusers backend on the tiny fixture model, each against an independent formulation:

* fp8 storage = the full model whose Linear weights were rounded to float8_e4m3fn by hand (bit-exact), the norms
  and modulation Linears untouched, and within a stated tolerance of plain bf16;
* block offloading (CPU -> CPU here) = the full model, exactly;
* GGUF: a Q8_0 file written with gguf-py's writer, run quantised: every weight row where gguf-py's own numpy
  dequantisation puts it, the same output as dequantising on load, and within quantisation tolerance of the
  safetensors weights; LoRAs merge into quantised weights within one quantisation step.
"""

import gguf
import numpy as np
import pytest
import torch
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor
from safetensors.torch import load_file

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.backends.diffusers_backend import ReferenceRMSNorm, load_diffusers_backend
from e2p_core.backends import gguf as gguf_backend
from e2p_core.backends.gguf import load_gguf_dit, quantize
from e2p_core.backends.memory import MEMORY_MODES
from e2p_core.checkpoints import LoraPair, bfl_to_diffusers, lora_to_kohya, save_safetensors_atomic
from e2p_core.cli import main as cli_main
from e2p_core.errors import InputError
from e2p_core.pipeline import perceive
from e2p_core.prompts import load_prompt_embeddings
from e2p_core.weights import DiTWeights, load_dit, load_vae

Q8_0 = gguf.GGMLQuantizationType.Q8_0
MODULATION_KEYS = ("_mod.lin.", "modulation.lin.", "adaLN_modulation")  # BFL names of the adaLN Linears
# Observed on this model (random weights exaggerate errors): fp8 vs bf16 output max |diff| ~0.01-0.03.
FP8_OUTPUT_ATOL = 0.06
# Q8_0: each weight within half a step of max|row block|/127; the tiny model's output moves by ~1e-3.
Q8_OUTPUT_ATOL = 0.01


@pytest.fixture(scope="module")
def dit():
    return load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)


@pytest.fixture(scope="module")
def vae():
    return load_vae(FIXTURES / "vae_bfl.safetensors")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def run(dit: DiTWeights, vae, prompt_files, image, dtype=torch.float32, memory_mode="full", task="depth"):
    denoiser, codec = load_diffusers_backend(dit, vae, dtype, "cpu", memory_mode=memory_mode)
    prompt = load_prompt_embeddings(prompt_files[task]).to("cpu", dtype)
    return perceive(denoiser, codec, image, task, prompt, resolution=64), denoiser


def with_weights(dit: DiTWeights, state_dict_bfl: dict) -> DiTWeights:
    return DiTWeights(state_dict_bfl, dit.architecture, dit.source_format, dit.time_embedding)


# ------------------------------------------------------------------------------------------------------------ fp8


def test_fp8_storage_is_bf16_compute_on_fp8_rounded_linears(dit, vae, prompt_files, image):
    fp8, denoiser = run(dit, vae, prompt_files, image, torch.bfloat16, "fp8")
    transformer = denoiser.transformer
    block = transformer.transformer_blocks[0]
    assert isinstance(block.attn.norm_q, ReferenceRMSNorm) and block.attn.norm_q.weight.dtype == torch.bfloat16
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn and block.ff.net[2].bias.dtype == torch.float8_e4m3fn
    assert block.norm1.linear.weight.dtype == torch.bfloat16  # modulation stays in the compute dtype
    assert denoiser.dtype == torch.bfloat16

    def rounded(key, value):
        keep = value.ndim < 1 or key.endswith(".scale") or any(name in key for name in MODULATION_KEYS)
        return value if keep else value.to(torch.float8_e4m3fn).to(torch.bfloat16)

    by_hand = with_weights(dit, {key: rounded(key, value.to(torch.bfloat16))
                                 for key, value in dit.state_dict_bfl.items()})
    expected, _ = run(by_hand, vae, prompt_files, image, torch.bfloat16, "full")
    assert torch.equal(fp8.velocity, expected.velocity) and torch.equal(fp8.output, expected.output)

    bf16, _ = run(dit, vae, prompt_files, image, torch.bfloat16, "full")
    assert not torch.equal(fp8.velocity, bf16.velocity)
    assert (fp8.output - bf16.output).abs().max() < FP8_OUTPUT_ATOL


# -------------------------------------------------------------------------------------------------------- offload


@pytest.mark.parametrize("mode, reference_mode", [("offload", "full"), ("fp8-offload", "fp8")])
def test_block_offloading_changes_nothing(dit, vae, prompt_files, image, mode, reference_mode):
    dtype = torch.bfloat16 if "fp8" in mode else torch.float32
    offloaded, denoiser = run(dit, vae, prompt_files, image, dtype, mode, task="normal")
    hooks = getattr(denoiser.transformer.single_transformer_blocks[0], "_diffusers_hook", None)
    assert hooks is not None and hooks.get_hook("group_offloading") is not None
    expected, _ = run(dit, vae, prompt_files, image, dtype, reference_mode, task="normal")
    assert torch.equal(offloaded.velocity, expected.velocity) and torch.equal(offloaded.output, expected.output)


def test_every_mode_leaves_the_callers_weights_untouched(dit, vae):
    """bf16 weights are adopted, not copied, by the model; casting them to fp8 or offloading them must not write
    through to the caller's state dict (the benchmark loads one DiTWeights in every mode)."""
    weights = with_weights(dit, {key: value.to(torch.bfloat16) for key, value in dit.state_dict_bfl.items()})
    before = {key: value.clone() for key, value in weights.state_dict_bfl.items()}
    for mode in MEMORY_MODES:
        load_diffusers_backend(weights, vae, torch.bfloat16, "cpu", memory_mode=mode)
        assert all(torch.equal(weights.state_dict_bfl[key], value) for key, value in before.items()), mode


def test_unknown_memory_mode_is_named(dit, vae):
    with pytest.raises(InputError, match="fp4.*full, fp8, offload"):
        load_diffusers_backend(dit, vae, torch.float32, "cpu", memory_mode="fp4")
    assert set(MEMORY_MODES) == {"full", "fp8", "offload", "fp8-offload", "gguf"}


# ----------------------------------------------------------------------------------------------------------- GGUF


def write_gguf(path, state_dict_bfl: dict, prefix: str = "") -> None:
    """Q8_0 for the Linear weights as city96's FLUX GGUFs (BFL names); biases F16 and norm scales BF16 here, to
    read every plain type."""
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for key, value in state_dict_bfl.items():
        array = value.float().numpy()
        if value.ndim == 2:
            writer.add_tensor(prefix + key, gguf.quants.quantize(array, Q8_0), raw_dtype=Q8_0)
        elif key.endswith(".scale"):
            bf16 = gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(prefix + key, bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(prefix + key, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def numpy_dequantized(path) -> dict[str, torch.Tensor]:
    """The GGUF file read back with gguf-py alone: its numpy dequantisation, independent of diffusers' torch one."""
    tensors = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
        tensors[tensor.name.removeprefix("model.diffusion_model.")] = torch.from_numpy(values.astype(np.float32))
    return tensors


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, dit):
    path = tmp_path_factory.mktemp("gguf") / "kontext_tiny_Q8_0.gguf"
    write_gguf(path, dit.state_dict_bfl, prefix="model.diffusion_model.")  # ComfyUI's prefix must be tolerated
    return path


def test_gguf_runs_quantised_as_its_dequantised_weights(gguf_file, dit, vae, prompt_files, image):
    quantized = load_gguf_dit(gguf_file, TINY_DIT_CONFIG)
    assert quantized.architecture == dit.architecture
    plain = quantized.state_dict_bfl
    assert plain["txt_in.bias"].dtype == torch.float16 and plain["single_blocks.0.norm.key_norm.scale"].dtype == (
        torch.bfloat16)
    result, denoiser = run(quantized, vae, prompt_files, image, memory_mode="gguf")
    transformer = denoiser.transformer
    block = transformer.single_transformer_blocks[1]
    assert isinstance(block.attn.to_v, GGUFLinear) and isinstance(transformer.norm_out.linear, GGUFLinear)
    assert block.attn.to_v.weight.dtype == torch.uint8  # still the Q8_0 blocks

    # Every quantised row landed where gguf-py's own dequantisation puts it. diffusers computes Q8_0 as
    # fp16 scale x int8 in fp16, so values agree to fp16 rounding (half an ulp: 2^-11 relative).
    expected_weights = bfl_to_diffusers(numpy_dequantized(gguf_file))
    quantized_layers = [(name, m) for name, m in transformer.named_modules() if isinstance(m, GGUFLinear)]
    assert len(quantized_layers) == sum(value.ndim == 2 for value in expected_weights.values())
    for name, layer in quantized_layers:
        expected = expected_weights[f"{name}.weight"]
        dequantized = dequantize_gguf_tensor(layer.weight).float()
        assert ((dequantized - expected).abs() <= expected.abs() * 2**-11 + 1e-12).all(), name

    dequantized_on_load, _ = run(quantized, vae, prompt_files, image, memory_mode="full")
    torch.testing.assert_close(result.velocity, dequantized_on_load.velocity, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.output, dequantized_on_load.output, atol=1e-6, rtol=0)

    original, _ = run(dit, vae, prompt_files, image)
    assert not torch.equal(result.velocity, original.velocity)
    assert (result.output - original.output).abs().max() < Q8_OUTPUT_ATOL


def test_gguf_mode_quantises_safetensors_weights_on_load(dit, vae, prompt_files, image):
    result, denoiser = run(dit, vae, prompt_files, image, memory_mode="gguf", task="matting")
    assert isinstance(denoiser.transformer.transformer_blocks[0].ff_context.net[0].proj, GGUFLinear)
    original, _ = run(dit, vae, prompt_files, image, task="matting")
    assert (result.output - original.output).abs().max() < Q8_OUTPUT_ATOL


def test_q8_0_quantisation_is_byte_identical_to_gguf_py(monkeypatch):
    """Our torch Q8_0 (used for quantising on load and requantising after LoRA merges) = gguf-py's numpy one."""
    monkeypatch.setattr(gguf_backend, "Q8_0_ROWS_PER_SLICE", 20)  # 48 rows: slices of 20, 20 and 8
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 96, generator=generator) * 0.1
    weight[0, :32] = 0  # an all-zero block
    weight[1, :32] = torch.arange(32) / 31 * 127 / 100  # values landing on x.5 steps
    ours = quantize(weight).as_tensor()
    assert torch.equal(ours, torch.from_numpy(gguf.quants.quantize(weight.numpy(), Q8_0)))
    assert quantize(weight.to(torch.bfloat16)).quant_type == Q8_0


def test_lora_merges_into_quantised_weights_within_one_step(gguf_file, dit, tmp_path):
    generator = torch.Generator().manual_seed(0)
    modules = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1")
    pairs = {}
    for module in modules:
        out_features, in_features = dit.state_dict_bfl[f"{module}.weight"].shape
        pairs[module] = LoraPair(torch.randn(4, in_features, generator=generator) * 0.3,
                                 torch.randn(out_features, 4, generator=generator) * 0.3)
    lora_path = tmp_path / "lora.safetensors"
    save_safetensors_atomic(lora_to_kohya(pairs), lora_path, metadata={"e2p.time_embedding": "bf16"})

    merged_dit = load_gguf_dit(gguf_file, TINY_DIT_CONFIG, loras=[(lora_path, 0.5)])
    assert merged_dit.time_embedding == "bf16"  # the LoRA's record, as load_dit reads it
    merged = merged_dit.state_dict_bfl
    base = numpy_dequantized(gguf_file)
    for module, pair in pairs.items():
        key = f"{module}.weight"
        assert merged[key].quant_type == Q8_0
        expected = base[key] + 0.5 * pair.scale * (pair.up @ pair.down)
        blocks = expected.reshape(expected.shape[0], -1, 32)  # Q8_0: 32 values share one fp16 scale max|x|/127
        step = blocks.abs().amax(-1, keepdim=True) / 127
        error = (dequantize_gguf_tensor(merged[key]).float().reshape(blocks.shape) - blocks).abs()
        # Half a step of rounding, plus the fp16 roundings of the base dequantisation, the scale and the product
        # (each below 2^-11 of the block's max |x| = 127 steps).
        assert (error <= step * (0.5 + 127 * 2**-9)).all()
        assert error.max() > step.max() * 0.05  # it was requantised, not stored exactly
    untouched = "double_blocks.1.img_attn.qkv.weight"  # no LoRA there: the file's bytes, as they were
    assert torch.equal(merged[untouched].as_tensor(), load_gguf_dit(gguf_file).state_dict_bfl[untouched].as_tensor())


def test_cli_predicts_from_a_gguf_file(gguf_file, tmp_path, prompt_files, dit_config_file):
    common = ["predict", "--task", "depth", "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds",
              str(prompt_files["depth"]), "--image", str(FIXTURES / "input.png"), "--dtype", "fp32", "--device",
              "cpu", "--resolution", "64", "--dit-config", str(dit_config_file)]
    outputs = {}
    for name, dit_path, mode in (("gguf", gguf_file, "gguf"), ("st", FIXTURES / "dit_bfl.safetensors", "full")):
        raw = tmp_path / f"{name}.safetensors"
        assert cli_main([*common, "--dit", str(dit_path), "--memory-mode", mode, "--out", str(tmp_path / f"{name}.png"),
                         "--raw", str(raw)]) == 0
        outputs[name] = load_file(raw)["output"]
    assert outputs["gguf"].shape == outputs["st"].shape
    assert 0 < (outputs["gguf"] - outputs["st"]).abs().max() < Q8_OUTPUT_ATOL
