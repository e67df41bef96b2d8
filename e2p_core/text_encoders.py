"""FLUX's two text encoders, CLIP-L and T5-XXL: where their files are and how they load with ``transformers``.

They come in two layouts, and both load here:

* a **diffusers FLUX folder** (FLUX.1-Kontext-dev, FLUX.1-schnell): ``text_encoder/``, ``tokenizer/``,
  ``text_encoder_2/``, ``tokenizer_2/``, each a transformers folder with its config;
* **ComfyUI single files** (``models/text_encoders``, as ``comfyanonymous/flux_text_encoders`` ships them):
  ``clip_l.safetensors`` and ``t5xxl_fp16.safetensors`` (or the ``t5xxl_fp8_e4m3fn[_scaled]`` variants). They use
  transformers' key names (``text_model.*`` for CLIP, ``shared.weight`` + ``encoder.*`` for T5) but carry no config
  and no tokenizer. The sizes are read from the tensor shapes over the CLIP-L / T5-XXL configs written below, so any
  size loads through the same code; the tokenizers are the FLUX ones (``flux_tokenizers/tokenizer{,_2}`` next to the
  files, where ``python -m e2p_core download`` puts them) or the copies ComfyUI ships (``comfy/sd1_tokenizer``,
  ``comfy/text_encoders/t5_tokenizer``): they give the same token ids.

``transformers`` is imported only when an encoder is loaded.
"""

import importlib.util
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import safetensors
import torch

from .checkpoints.io import FP8_DROPPED_KEY, FP8_SCALE_SUFFIXES, dequantize, load_state_dict
from .errors import CheckpointError, E2PError
from .hub import TEXT_ENCODER_KEYS, TOKENIZER_KEYS, Store, find_local, model_file, resolve_all
from .hub.sources import TEXT_ENCODERS_REPO

if TYPE_CHECKING:  # annotations only: transformers is imported when an encoder is loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EncoderKind = Literal["clip", "t5"]

# Subfolders of a diffusers FLUX repository that hold the two text encoders and their tokenizers.
DIFFUSERS_SUBFOLDERS = {"clip": ("text_encoder", "tokenizer"), "t5": ("text_encoder_2", "tokenizer_2")}

# ComfyUI single files, in order of preference (full precision first).
CLIP_FILE_NAMES = ("clip_l.safetensors",)
T5_FILE_NAMES = ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp8_e4m3fn.safetensors")
# The FLUX tokenizer folders next to the single files (``download --comfyui`` puts them there).
FLUX_TOKENIZERS_DIR = "flux_tokenizers"
# The tokenizers inside a ComfyUI checkout, relative to its root.
COMFY_TOKENIZER_DIRS = {"clip": Path("comfy", "sd1_tokenizer"), "t5": Path("comfy", "text_encoders", "t5_tokenizer")}

# The text tower of OpenAI CLIP ViT-L/14 (FLUX's text_encoder/config.json) and Google T5 v1.1 XXL's encoder
# (text_encoder_2/config.json). Single files set the sizes from their shapes; these are the rest.
CLIP_L_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
}
T5_XXL_CONFIG = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "pad_token_id": 0, "eos_token_id": 1,
}
CLIP_HEAD_DIM = 64  # every OpenAI CLIP text tower (B, L, H, G) splits its width into 64-wide heads
CLIP_PREFIX = "text_model."  # CLIP's key prefix in the files; transformers >= 5 drops it from CLIPTextModel's keys

INSTALL_HINT = "encoding prompts needs transformers, a dependency of this package: `pip install transformers`"


@dataclass(frozen=True)
class EncoderFiles:
    """One text encoder: its weights (a transformers model folder or one safetensors file) and tokenizer folder."""

    weights: Path
    tokenizer: Path


@dataclass(frozen=True)
class TextEncoders:
    clip: EncoderFiles
    t5: EncoderFiles

    def identity(self) -> list[list]:
        """[part, name, size, modification time] of every file the encoders read (weights, configs, tokenizers),
        names relative to each part: it changes when a file is replaced, not when the folder moves."""
        entries = []
        for part, path in (("clip", self.clip.weights), ("clip_tokenizer", self.clip.tokenizer),
                           ("t5", self.t5.weights), ("t5_tokenizer", self.t5.tokenizer)):
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for file in files:
                stat = file.stat()
                name = file.relative_to(path).as_posix() if path.is_dir() else file.name
                entries.append([part, name, stat.st_size, stat.st_mtime_ns])
        return entries


# ------------------------------------------------------------------------------------------------------- finding


def find_text_encoders(location: str | Path) -> TextEncoders:
    """The encoders in ``location``: a diffusers FLUX folder, a ComfyUI ``models/text_encoders`` (or ``models/clip``)
    folder with single files, or a ComfyUI root holding such a folder."""
    folder = Path(location)
    if not folder.is_dir():
        raise CheckpointError(f"text encoder folder {folder} does not exist; {_LAYOUTS}")
    subfolders = [name for pair in DIFFUSERS_SUBFOLDERS.values() for name in pair]
    missing = [name for name in subfolders if not (folder / name).is_dir()]
    if not missing:
        return TextEncoders(*(EncoderFiles(folder / model, folder / tokenizer)
                              for model, tokenizer in DIFFUSERS_SUBFOLDERS.values()))
    if len(missing) < len(subfolders):
        raise CheckpointError(f"text encoder folder {folder} lacks the subfolders {missing} of a diffusers FLUX "
                              f"folder, which holds {subfolders} (CLIP-L model + tokenizer, T5-XXL model + tokenizer)")
    for candidate in (folder, folder / "models" / "text_encoders", folder / "models" / "clip"):
        clip, t5 = _first_file(candidate, CLIP_FILE_NAMES, "clip_l*"), _first_file(candidate, T5_FILE_NAMES, "t5xxl*")
        if clip and t5:
            return TextEncoders(EncoderFiles(clip, comfy_tokenizer(candidate, "clip")),
                                EncoderFiles(t5, comfy_tokenizer(candidate, "t5")))
    present = sorted(entry.name for entry in folder.iterdir())[:12]
    raise CheckpointError(f"no text encoders found in {folder} (it holds {present}); {_LAYOUTS}")


_LAYOUTS = (
    "expected a diffusers FLUX folder (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, as "
    "FLUX.1-Kontext-dev), a ComfyUI models/text_encoders folder with clip_l.safetensors and t5xxl_fp16.safetensors "
    "(or t5xxl_fp8_e4m3fn[_scaled].safetensors), or a ComfyUI folder holding one; "
    "`python -m e2p_core download` fetches them"
)


def _first_file(folder: Path, preferred: tuple[str, ...], pattern: str) -> Path | None:
    if not folder.is_dir():
        return None
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    return next(iter(sorted(folder.glob(f"{pattern}.safetensors"))), None)


def comfy_tokenizer(text_encoder_folder: Path, kind: EncoderKind) -> Path:
    """The tokenizer folder for ComfyUI single files in ``text_encoder_folder``: the FLUX one next to them, else the
    copy of the ComfyUI checkout they sit in (``<root>/models/text_encoders``), else that of the running ComfyUI."""
    flux_subfolder = DIFFUSERS_SUBFOLDERS[kind][1]
    candidates = [text_encoder_folder / FLUX_TOKENIZERS_DIR / flux_subfolder]
    if text_encoder_folder.parent.name == "models":
        candidates.append(text_encoder_folder.parent.parent / COMFY_TOKENIZER_DIRS[kind])
    running = running_comfyui_root()
    if running is not None:
        candidates.append(running / COMFY_TOKENIZER_DIRS[kind])
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise CheckpointError(
        f"no {kind.upper()} tokenizer for the text encoders in {text_encoder_folder}: looked in "
        f"{[str(c) for c in candidates]}. Put FLUX's {flux_subfolder}/ folder there as "
        f"{FLUX_TOKENIZERS_DIR}/{flux_subfolder} (`python -m e2p_core download --comfyui ...` does), or run inside "
        f"ComfyUI, which ships {COMFY_TOKENIZER_DIRS[kind].as_posix()}"
    )


def running_comfyui_root() -> Path | None:
    """The root of the importable ComfyUI (the folder above its ``comfy`` package), without importing it."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


@dataclass(frozen=True)
class EncoderSource:
    """Text encoders that may not be on disk yet: ``identity`` keys the cache, ``locate`` finds (or fetches) them.

    A cache hit needs only ``identity``, so a cached prompt never loads, finds or downloads an encoder.
    """

    identity: list
    locate: Callable[[], TextEncoders]
    description: str


def local_encoder_source(text_encoders: str | Path) -> EncoderSource:
    """The encoders in a folder (see ``find_text_encoders``), identified by their files' names, sizes and times."""
    encoders = find_text_encoders(text_encoders)
    return EncoderSource(encoders.identity(), lambda: encoders, str(text_encoders))


def hub_encoder_source(store: Store) -> EncoderSource:
    """The sources table's encoders (clip_l + t5xxl_fp16 of comfyanonymous/flux_text_encoders, FLUX's tokenizers),
    identified by their hub names: ``locate`` finds them in ``store`` or the Hugging Face cache, else downloads them."""

    def locate() -> TextEncoders:
        paths = resolve_all(TEXT_ENCODER_KEYS, store)
        clip_tokenizer, t5_tokenizer = (paths[TOKENIZER_KEYS[group][0]].parent
                                        for group in ("clip_tokenizer", "t5_tokenizer"))
        return TextEncoders(EncoderFiles(paths["clip_l"], clip_tokenizer), EncoderFiles(paths["t5xxl_fp16"],
                                                                                         t5_tokenizer))

    identity = [[key, model_file(key).hub.repo, model_file(key).hub.path, model_file(key).hub.revision]
                for key in TEXT_ENCODER_KEYS]
    return EncoderSource(identity, locate, f"{TEXT_ENCODERS_REPO} ({store.description})")


def automatic_encoder_source(store: Store = Store()) -> EncoderSource:
    """The encoders to use when none were named: the table's files when all are on disk (in ``store`` or the Hugging
    Face cache), else whatever encoders the store's text_encoders folders hold (a ComfyUI install's, fp8 T5 included,
    with ComfyUI's tokenizers), else the table's files, downloaded when the prompt is not cached yet.

    Files downloaded on a first run are found by the first rule on the next, so the cache entry stays the same.
    """
    if all(find_local(key, store) for key in TEXT_ENCODER_KEYS):
        return hub_encoder_source(store)
    for folder in store.search_dirs(model_file("clip_l")):
        try:
            return local_encoder_source(folder)
        except CheckpointError:  # no (complete) set there: the hub fills the gaps
            continue
    return hub_encoder_source(store)


# ------------------------------------------------------------------------------------------------------- loading


def load_encoder(
    files: EncoderFiles, kind: EncoderKind, dtype: torch.dtype
) -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """(tokenizer, model in eval mode on the CPU in ``dtype``) for one encoder, from either layout."""
    tokenizer = load_tokenizer(files.tokenizer)
    if files.weights.is_dir():
        model = _load_transformers_folder(files.weights, kind, dtype)
    else:
        model = load_single_file(files.weights, kind, dtype, tokenizer)
    return tokenizer, model.eval()


def load_tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    """The transformers tokenizer saved in ``folder`` (a FLUX ``tokenizer{,_2}/`` or a ComfyUI copy)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise E2PError(INSTALL_HINT) from None
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {error}") from error


def _load_transformers_folder(folder: Path, kind: EncoderKind, dtype: torch.dtype) -> "PreTrainedModel":
    from transformers import CLIPTextModel, T5EncoderModel

    model_class = CLIPTextModel if kind == "clip" else T5EncoderModel
    try:
        return model_class.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"cannot load a {model_class.__name__} from {folder}: {error}") from error


def load_single_file(
    path: Path, kind: EncoderKind, dtype: torch.dtype, tokenizer: "PreTrainedTokenizerBase"
) -> "PreTrainedModel":
    """A ComfyUI single-file CLIP or T5 as a transformers model: config from the shapes, weights assigned in place.

    fp8 files (plain or ComfyUI "scaled") are dequantised to ``dtype`` tensor by tensor, so the host holds about one
    copy of the model, never the file and the model side by side.
    """
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    weights = _read_weights(path, kind, dtype)
    shapes = {key: tuple(value.shape) for key, value in weights.items()}
    if kind == "clip":
        # The pooled vector is read at the tokenizer's end token (FLUX: its first occurrence, = argmax of the ids).
        specials = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id}
        config, model_class = CLIPTextConfig(**clip_config(shapes, path), **specials), CLIPTextModel
    else:
        config, model_class = T5Config(**t5_config(shapes, path)), T5EncoderModel
    with init_empty_weights():  # parameters on the meta device: no random init of a 4.7B-parameter model
        model = model_class(config)
    expected = set(model.state_dict())
    if kind == "clip" and any(key.startswith(CLIP_PREFIX) for key in expected):  # transformers < 5 keeps the prefix
        weights = {CLIP_PREFIX + key: value for key, value in weights.items()}
    if kind == "t5" and "shared.weight" in weights:  # the encoder's embedding is tied to `shared`; files hold one
        weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
    missing = sorted(expected - set(weights))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensors of a {model_class.__name__}, e.g. {missing[:3]}")
    model.load_state_dict({key: weights[key] for key in expected}, strict=True, assign=True)
    return model


def _read_weights(path: Path, kind: EncoderKind, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors in transformers' names (CLIP without ``text_model.``), fp8 dequantised, cast to ``dtype``;
    tensors a text model does not use (CLIP's projection and logit scale, position-id buffers) are dropped."""
    state = load_state_dict(path)
    scale_of = {}  # weight key -> its ComfyUI scaled-fp8 scale key
    for key in state:
        for suffix in FP8_SCALE_SUFFIXES:
            if key.endswith(suffix):
                scale_of[key.removesuffix(suffix) + ".weight"] = key
    weights = {}
    for key in sorted(state):
        name = key.removeprefix(CLIP_PREFIX) if kind == "clip" else key
        if key.endswith(FP8_SCALE_SUFFIXES) or FP8_DROPPED_KEY.search(key) or _unused(name, kind):
            continue
        # One tensor (and its scale) at a time: the file's copy is released as the model's is made.
        scale = {scale_of[key]: state[scale_of[key]]} if key in scale_of else {}
        tensor = dequantize({key: state.pop(key), **scale}, dtype)[key]
        weights[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return weights


def _unused(name: str, kind: EncoderKind) -> bool:
    if kind == "clip":
        return not name.startswith(("embeddings.token_", "embeddings.position_embedding.", "encoder.", "final_"))
    return not name.startswith(("shared.", "encoder."))


def clip_config(shapes: dict[str, tuple[int, ...]], source: Path | str = "CLIP") -> dict:
    """CLIP-L's config with the sizes of the weights ``shapes`` (transformers names, no ``text_model.``)."""
    vocab_size, hidden_size = _shape(shapes, "embeddings.token_embedding.weight", source)
    sizes = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "projection_dim": hidden_size,
        "max_position_embeddings": _shape(shapes, "embeddings.position_embedding.weight", source)[0],
        "num_hidden_layers": _count_blocks(shapes, r"encoder\.layers\.(\d+)\.", source),
        "intermediate_size": _shape(shapes, "encoder.layers.0.mlp.fc1.weight", source)[0],
        "num_attention_heads": max(1, hidden_size // CLIP_HEAD_DIM),
    }
    return _report_size({**CLIP_L_CONFIG, **sizes}, CLIP_L_CONFIG, "CLIP-L", source)


def t5_config(shapes: dict[str, tuple[int, ...]], source: Path | str = "T5") -> dict:
    """T5-XXL's encoder config with the sizes of the weights ``shapes``; only the gated-GELU T5 v1.1 loads."""
    if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in shapes:
        raise CheckpointError(f"{source} is not a T5 v1.1 encoder (no gated feed-forward wi_0/wi_1): FLUX uses "
                              f"T5-XXL v1.1, e.g. t5xxl_fp16.safetensors")
    vocab_size, d_model = _shape(shapes, "shared.weight", source)
    num_buckets, num_heads = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                    source)
    sizes = {
        "vocab_size": vocab_size, "d_model": d_model, "num_heads": num_heads,
        "relative_attention_num_buckets": num_buckets,
        "d_kv": _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", source)[0] // num_heads,
        "d_ff": _shape(shapes, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", source)[0],
        "num_layers": _count_blocks(shapes, r"encoder\.block\.(\d+)\.", source),
    }
    return _report_size({**T5_XXL_CONFIG, **sizes}, T5_XXL_CONFIG, "T5-XXL", source)


def _shape(shapes: dict[str, tuple[int, ...]], key: str, source: Path | str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source} has no tensor {key!r}; it holds e.g. {sorted(shapes)[:4]}")
    return shapes[key]


def _count_blocks(shapes: dict[str, tuple[int, ...]], pattern: str, source: Path | str) -> int:
    indices = {int(match.group(1)) for key in shapes if (match := re.match(pattern, key))}
    if not indices or indices != set(range(len(indices))):
        raise CheckpointError(f"{source}: layer numbers {sorted(indices)[:6]} are not 0..N-1")
    return len(indices)


def _report_size(config: dict, reference: dict, name: str, source: Path | str) -> dict:
    differing = {key: config[key] for key in reference if config[key] != reference[key]}
    if differing:  # a smaller or other model: it loads, but its embeddings are not what the DiT was trained on
        logger.warning("%s is not %s-sized (%s); its prompt embeddings will not suit Edit2Perceive", source, name,
                       differing)
    return config
