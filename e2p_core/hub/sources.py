"""Where every model file comes from: the one table of hub sources, and the sets of files each use needs.

Each entry (:class:`ModelFile`) says which file it is, where it is fetched from on the Hugging Face hub (repository,
path, revision), how big it is, its licence and whether the repository is gated, and where it goes in ComfyUI
(``models/<folder>/<name>``). Nothing here touches the disk or the network: :mod:`e2p_core.hub.fetch` does.

Sizes are what the hub listed for these files (approximate where marked ``~``); they are shown to users and used for
the free-disk check until the hub's own answer (the exact ``X-Linked-Size``) replaces them at download time.
"""

from dataclasses import dataclass

from ..errors import InputError
from ..tasks import TASKS

KONTEXT_REPO = "black-forest-labs/FLUX.1-Kontext-dev"
SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
E2P_REPO = "Seq2Tri/Edit2Perceive"
KONTEXT_FP8_REPO = "Comfy-Org/flux1-kontext-dev_ComfyUI"
TEXT_ENCODERS_REPO = "comfyanonymous/flux_text_encoders"
STEP1X_REPO = "stepfun-ai/Step1X-Edit"
FE2E_REPO = "exander/FE2E"

FLUX_DEV_LICENCE = "FLUX.1 [dev] Non-Commercial License"


@dataclass(frozen=True)
class HubFile:
    """One file of a hub repository."""

    repo: str  # "owner/name"
    path: str  # path inside the repository, "/"-separated
    revision: str = "main"


@dataclass(frozen=True)
class ModelFile:
    """A file the engine or the nodes can use, and how to get it."""

    key: str  # the name callers ask for, e.g. "depth_lora"
    folder: str  # ComfyUI model folder: diffusion_models | loras | vae | text_encoders | e2p_prompts
    name: str  # path inside that folder (and inside a --to folder), "/"-separated
    approx_bytes: int
    hub: HubFile
    licence: str
    gated: bool  # downloading needs an accepted licence and a token
    what: str  # one line for users
    # The same bytes in an ungated repository, used when the hub's LFS sha256 of both agree (checked at download).
    ungated_copy: HubFile | None = None
    # What to use instead when the gated repository refuses (shown in the error).
    ungated_alternative: str | None = None
    family: str = "e2p"  # the model family the file belongs to: "e2p" (Edit2Perceive) or "fe2e"

    @property
    def size_text(self) -> str:
        return format_bytes(self.approx_bytes)


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


_KONTEXT_ALTERNATIVE = (
    f"the ungated ComfyUI fp8 repack ({KONTEXT_FP8_REPO}, ~11.9 GB: `--base fp8`), or an Edit2Perceive full "
    f"checkpoint that needs no base (`--weights full`)"
)


def _e2p_files() -> list[ModelFile]:
    files = []
    for task in TASKS:
        files.append(ModelFile(
            f"{task}_full", "diffusion_models", f"{task}.safetensors", 23_800_000_000,
            HubFile(E2P_REPO, f"{task}.safetensors"), f"see {E2P_REPO} (a FLUX.1 Kontext [dev] fine-tune)", False,
            f"Edit2Perceive {task}: the whole fine-tuned DiT (DiffSynth naming, bf16)",
        ))
        files.append(ModelFile(
            f"{task}_lora", "loras", f"{task}_lora.safetensors", 610_000_000,
            HubFile(E2P_REPO, f"{task}_lora.safetensors"), f"see {E2P_REPO}", False,
            f"Edit2Perceive {task}: the rank-64 LoRA (kohya naming) for the FLUX.1 Kontext [dev] base",
        ))
    return files


# CLIP-L (tokenizer/) and T5 (tokenizer_2/) tokenizers of the FLUX repositories; schnell's are ungated and the same
# as Kontext's. ComfyUI ships equivalents in comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer. T5's
# tokenizer.json holds the whole fast tokenizer, so its sentencepiece model (spiece.model) is not needed.
_TOKENIZER_FILES = {
    "clip_tokenizer": ("tokenizer", {"vocab.json": 1_059_962, "merges.txt": 524_619,
                                     "special_tokens_map.json": 588, "tokenizer_config.json": 705}),
    "t5_tokenizer": ("tokenizer_2", {"tokenizer.json": 2_424_064, "special_tokens_map.json": 2_543,
                                     "tokenizer_config.json": 20_817}),
}


def _tokenizer_files() -> list[ModelFile]:
    return [
        ModelFile(f"{group}/{filename}", "text_encoders", f"flux_tokenizers/{subfolder}/{filename}", size,
                  HubFile(SCHNELL_REPO, f"{subfolder}/{filename}"), "Apache-2.0", False,
                  f"{group.split('_')[0].upper()} tokenizer file {filename} (FLUX {subfolder}/)")
        for group, (subfolder, sizes) in _TOKENIZER_FILES.items()
        for filename, size in sizes.items()
    ]


MODEL_FILES: dict[str, ModelFile] = {file.key: file for file in [
    ModelFile(
        "kontext", "diffusion_models", "flux1-kontext-dev.safetensors", 23_800_000_000,
        HubFile(KONTEXT_REPO, "flux1-kontext-dev.safetensors"), FLUX_DEV_LICENCE, True,
        "FLUX.1 Kontext [dev], the base the Edit2Perceive LoRAs were trained on (bf16, BFL naming)",
        ungated_alternative=_KONTEXT_ALTERNATIVE,
    ),
    ModelFile(
        "kontext_fp8", "diffusion_models", "flux1-dev-kontext_fp8_scaled.safetensors", 11_900_000_000,
        HubFile(KONTEXT_FP8_REPO, "split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors"),
        FLUX_DEV_LICENCE, False,
        "FLUX.1 Kontext [dev] as ComfyUI's scaled-fp8 repack (half the size; not bit-identical to bf16)",
    ),
    ModelFile(
        "vae", "vae", "ae.safetensors", 335_300_000,
        HubFile(KONTEXT_REPO, "ae.safetensors"), FLUX_DEV_LICENCE, True,
        "the Flux VAE (autoencoder), BFL naming",
        ungated_copy=HubFile(SCHNELL_REPO, "ae.safetensors"),
        ungated_alternative=f"the same file from {SCHNELL_REPO} (Apache-2.0) when the hub lists the same sha256",
    ),
    ModelFile(
        "clip_l", "text_encoders", "clip_l.safetensors", 246_100_000,
        HubFile(TEXT_ENCODERS_REPO, "clip_l.safetensors"), "MIT (OpenAI CLIP)", False,
        "CLIP-L text encoder (pooled prompt vector), ComfyUI naming",
    ),
    ModelFile(
        "t5xxl_fp16", "text_encoders", "t5xxl_fp16.safetensors", 9_790_000_000,
        HubFile(TEXT_ENCODERS_REPO, "t5xxl_fp16.safetensors"), "Apache-2.0 (Google T5 v1.1 XXL)", False,
        "T5-XXL text encoder (prompt tokens), fp16, ComfyUI naming",
    ),
    *_e2p_files(),
    *_tokenizer_files(),
    # FE2E: the Step1X-Edit checkpoint (DiT + connector) and its VAE, and FE2E's LoRA. FE2E's empty-prompt embedding
    # no_info.npz is in the FE2E GitHub repository (latent/no_info.npz), not on the hub: pass --prompt-cache.
    ModelFile(
        "fe2e_dit", "diffusion_models", "step1x-edit-i1258.safetensors", 24_900_000_000,
        HubFile(STEP1X_REPO, "step1x-edit-i1258.safetensors"), "Apache-2.0", False,
        "Step1X-Edit, the base FE2E was fine-tuned from (DiT in BFL naming + the Qwen2 connector, bf16)",
        family="fe2e",
    ),
    ModelFile(
        "fe2e_vae", "vae", "step1x-edit-vae.safetensors", 335_000_000,
        HubFile(STEP1X_REPO, "vae.safetensors"), "Apache-2.0", False,
        "Step1X-Edit's VAE (BFL autoencoder naming)",
        family="fe2e",
    ),
    ModelFile(
        "fe2e_lora", "loras", "LDRN.safetensors", 620_000_000,
        HubFile(FE2E_REPO, "LDRN.safetensors"), f"see {FE2E_REPO}", False,
        "FE2E: the rank-64 LoRA (kohya, alpha 32) that turns Step1X-Edit into a depth + normal estimator (~size)",
        family="fe2e",
    ),
]}

FE2E_MODEL_KEYS = ("fe2e_dit", "fe2e_lora", "fe2e_vae")

TOKENIZER_KEYS: dict[str, tuple[str, ...]] = {
    group: tuple(f"{group}/{filename}" for filename in sizes) for group, (_, sizes) in _TOKENIZER_FILES.items()
}
TEXT_ENCODER_KEYS = ("clip_l", "t5xxl_fp16", *TOKENIZER_KEYS["clip_tokenizer"], *TOKENIZER_KEYS["t5_tokenizer"])

WEIGHTS_CHOICES = ("lora", "full")
BASE_CHOICES = {"bf16": "kontext", "fp8": "kontext_fp8"}


def model_file(key: str) -> ModelFile:
    try:
        return MODEL_FILES[key]
    except KeyError:
        raise InputError(f"unknown model file {key!r}; known: {sorted(MODEL_FILES)}") from None


def task_model_keys(task: str, weights: str = "lora", base: str = "bf16") -> list[str]:
    """The files that run ``task``: the FLUX.1 Kontext base + the task LoRA + the VAE (``weights="lora"``), or the
    task's full checkpoint + the VAE (``"full"``). ``base`` picks the Kontext file for LoRAs: ``bf16`` or ``fp8``."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if weights == "lora":
        if base not in BASE_CHOICES:
            raise InputError(f"unknown base {base!r}; expected one of {sorted(BASE_CHOICES)}")
        return [BASE_CHOICES[base], f"{task}_lora", "vae"]
    if weights == "full":
        return [f"{task}_full", "vae"]
    raise InputError(f"unknown weights {weights!r}; expected one of {list(WEIGHTS_CHOICES)}")
