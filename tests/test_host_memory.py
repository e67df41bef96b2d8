"""Host memory of loading: LoRAs merge into the loaded weights themselves, GGUF quantises layer by layer from the
file, and the fp8/GGUF builds let go of the checkpoint's memory mapping. The figures at real width are
``bench/host_memory.py``'s; these tests pin the mechanisms with storage identity and the process's own mappings."""

import gc
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, TINY_DIT_CONFIG

import e2p_core.checkpoints.lora as lora_module
from e2p_core.backends.diffusers_backend import load_diffusers_backend
from e2p_core.backends.gguf import load_gguf_dit, quantize_dit_file, quantize_state_dict
from e2p_core.checkpoints import (
    LoraPair,
    bfl_to_diffsynth,
    load_lora_file,
    load_state_dict,
    lora_to_kohya,
    merge_lora,
    merge_lora_in_place,
    save_safetensors_atomic,
)
from e2p_core.weights import load_dit, load_vae

LORA = FIXTURES / "lora_kohya.safetensors"
pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``path`` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def inside(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(low <= start and end <= high for low, high in ranges)


def hand_merged(weight: torch.Tensor, pair: LoraPair, strength: float) -> torch.Tensor:
    """``W + strength * scale * up @ down`` written out in full: float32 math, rounded once to W's dtype."""
    update = pair.scale * (pair.up.to(torch.float32) @ pair.down.to(torch.float32))
    return (weight.to(torch.float32) + strength * update).to(weight.dtype)


@pytest.fixture
def bf16_dit_file(tmp_path) -> Path:
    """The fixture DiT in bf16 (what real checkpoints hold), written to its own file."""
    path = tmp_path / "dit_bf16.safetensors"
    save_safetensors_atomic({key: value.to(torch.bfloat16) for key, value in
                             load_state_dict(FIXTURES / "dit_bfl.safetensors").items()}, path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_merge_writes_the_hand_merge_into_the_same_tensors(monkeypatch, dtype):
    monkeypatch.setattr(lora_module, "MERGE_ROWS_PER_SLICE", 7)  # several slices, a short last one
    base = {key: value.to(dtype) for key, value in load_state_dict(FIXTURES / "dit_bfl.safetensors").items()}
    lora = load_lora_file(LORA)
    state_dict = {key: value.clone() for key, value in base.items()}
    tensors_before = dict(state_dict)
    addresses_before = {key: value.data_ptr() for key, value in state_dict.items()}

    assert merge_lora_in_place(state_dict, lora, 0.75) is None
    assert all(state_dict[key] is tensors_before[key] for key in base)  # no entry replaced
    assert {key: value.data_ptr() for key, value in state_dict.items()} == addresses_before  # no storage swapped
    for module, pair in lora.items():
        key = f"{module}.weight"
        assert torch.equal(state_dict[key], hand_merged(base[key], pair, 0.75)), key
    untouched = set(base) - {f"{module}.weight" for module in lora}
    assert untouched and all(torch.equal(state_dict[key], base[key]) for key in untouched)

    copy = merge_lora(base, lora, 0.75)  # the copying merge: same numbers, the caller's tensors untouched
    assert all(torch.equal(copy[key], state_dict[key]) for key in base)
    assert all(torch.equal(base[key], value.to(dtype)) for key, value in
               load_state_dict(FIXTURES / "dit_bfl.safetensors").items())


def test_load_dit_merges_into_the_files_private_mapping_and_leaves_the_file_alone(bf16_dit_file):
    """No second copy: every merged weight still lies in the process's mapping of the checkpoint file (its pages
    copied on write, privately), and the file's bytes on disk do not change."""
    digest = hashlib.sha256(bf16_dit_file.read_bytes()).hexdigest()
    dit = load_dit(bf16_dit_file, TINY_DIT_CONFIG, loras=[(LORA, 0.5)])
    ranges = mapped_ranges(bf16_dit_file)
    assert ranges, "the safetensors file is expected to be memory-mapped"
    base = load_state_dict(bf16_dit_file)
    lora = load_lora_file(LORA)
    for module, pair in lora.items():
        merged = dit.state_dict_bfl[f"{module}.weight"]
        assert inside(merged, ranges), module
        assert torch.equal(merged, hand_merged(base[f"{module}.weight"], pair, 0.5)), module
    assert hashlib.sha256(bf16_dit_file.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("mode", ["fp8", "gguf"])
def test_fp8_and_gguf_builds_let_go_of_the_file_mapping(bf16_dit_file, mode):
    vae = load_vae(FIXTURES / "vae_bfl.safetensors")
    dit = load_dit(bf16_dit_file, TINY_DIT_CONFIG, loras=[(LORA, 1.0)])
    denoiser, _ = load_diffusers_backend(dit, vae, torch.bfloat16, "cpu", memory_mode=mode)
    del dit
    gc.collect()
    assert mapped_ranges(bf16_dit_file) == [], f"the {mode} model still holds the checkpoint's mapping"

    # The control: in full mode the model adopts the mapped weights, so the same check sees the mapping.
    dit = load_dit(bf16_dit_file, TINY_DIT_CONFIG)
    full, _ = load_diffusers_backend(dit, vae, torch.bfloat16, "cpu", memory_mode="full")
    del dit
    gc.collect()
    assert mapped_ranges(bf16_dit_file)
    assert inside(full.transformer.transformer_blocks[0].attn.to_q.weight, mapped_ranges(bf16_dit_file))


def scaled_fp8_file(path: Path, state_dict_bfl: dict) -> Path:
    """A ComfyUI-style scaled-fp8 file (``model.diffusion_model.`` prefix, ``scale_weight`` per Linear)."""
    out = {"model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in state_dict_bfl.items():
        if value.ndim == 2:
            scale = value.abs().amax().float() / 448
            out[f"model.diffusion_model.{key}"] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[f"model.diffusion_model.{key.removesuffix('.weight')}.scale_weight"] = scale.reshape(1)
        else:
            out[f"model.diffusion_model.{key}"] = value.to(torch.bfloat16)
    save_safetensors_atomic(out, path)
    return path


def test_gguf_mode_quantises_layer_by_layer_to_the_same_bytes(bf16_dit_file, tmp_path):
    """``quantize_dit_file`` reads one layer at a time yet gives exactly what loading the whole model, merging and
    quantising gives, for every naming and for scaled fp8; and it leaves no mapping of the file behind."""
    generator = torch.Generator().manual_seed(0)
    base = {key: value.to(torch.bfloat16) for key, value in load_state_dict(FIXTURES / "dit_bfl.safetensors").items()}
    extra_modules = ("final_layer.adaLN_modulation.1", "double_blocks.1.txt_attn.qkv")  # halves swap; fused rows
    pairs = {}
    for module in extra_modules:
        out_features, in_features = base[f"{module}.weight"].shape
        pairs[module] = LoraPair(torch.randn(4, in_features, generator=generator) * 0.3,
                                 torch.randn(out_features, 4, generator=generator) * 0.3, 0.5)
    second_lora = tmp_path / "second_lora.safetensors"
    save_safetensors_atomic(lora_to_kohya(pairs), second_lora)
    diffsynth = tmp_path / "dit_diffsynth.safetensors"
    save_safetensors_atomic(bfl_to_diffsynth(base), diffsynth)
    fp8 = scaled_fp8_file(tmp_path / "dit_fp8_scaled.safetensors", base)
    loras = [(LORA, 0.8), (second_lora, -1.5)]

    for path in (bf16_dit_file, diffsynth, fp8):
        streamed = quantize_dit_file(path, TINY_DIT_CONFIG, loras)
        assert mapped_ranges(path) == []
        whole = load_dit(path, TINY_DIT_CONFIG, loras)
        expected = quantize_state_dict(whole.state_dict_bfl)
        assert (streamed.architecture, streamed.source_format) == (whole.architecture, whole.source_format)
        assert streamed.state_dict_bfl.keys() == expected.keys()
        for key, value in expected.items():
            ours = streamed.state_dict_bfl[key]
            assert type(ours) is type(value) and getattr(ours, "quant_type", None) == getattr(value, "quant_type",
                                                                                              None), key
            assert ours.dtype == value.dtype and torch.equal(ours, value), (path.name, key)


def test_a_gguf_file_is_read_without_keeping_its_mapping(tmp_path):
    from test_memory_modes import write_gguf

    path = tmp_path / "tiny_Q8_0.gguf"
    write_gguf(path, load_state_dict(FIXTURES / "dit_bfl.safetensors"))
    loaded = load_gguf_dit(path, TINY_DIT_CONFIG, loras=[(LORA, 1.0)])
    gc.collect()
    assert mapped_ranges(path) == [] and loaded.state_dict_bfl


def test_requantising_merge_slices_rows_without_changing_a_byte(tmp_path, monkeypatch):
    """The ``.gguf`` + LoRA merge dequantises, adds and quantises slices of rows (host memory: one slice, not one
    float32 layer); the bytes equal the merge of whole layers."""
    import e2p_core.backends.gguf as gguf_backend
    from test_memory_modes import write_gguf

    path = tmp_path / "tiny_Q8_0.gguf"
    write_gguf(path, load_state_dict(FIXTURES / "dit_bfl.safetensors"))
    merged = {}
    for rows_per_slice in (10_000, 7):
        monkeypatch.setattr(gguf_backend, "MERGE_ROWS_PER_SLICE", rows_per_slice)
        merged[rows_per_slice] = load_gguf_dit(path, TINY_DIT_CONFIG, loras=[(LORA, 0.7)]).state_dict_bfl
    lora = load_lora_file(LORA)
    for module in lora:
        whole, sliced = merged[10_000][f"{module}.weight"], merged[7][f"{module}.weight"]
        assert sliced.quant_type == whole.quant_type and torch.equal(sliced.as_tensor(), whole.as_tensor()), module
        assert whole.shape[0] > 7
