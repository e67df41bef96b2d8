"""Model files from the Hugging Face hub: the sources table (``sources``) and "give me the local path of X" (``fetch``).

    from e2p_core.hub import Store, resolve, resolve_all, task_model_keys
    paths = resolve_all(task_model_keys("depth"))             # {key: Path}; from disk, else downloaded (HF cache)
    lora = resolve("depth_lora", Store.comfyui("ComfyUI"))   # ComfyUI/models/loras/depth_lora.safetensors
    clip_tokenizer_dir = resolve_all(TOKENIZER_KEYS["clip_tokenizer"])[...].parent

Importing this package does not import ``huggingface_hub``; only a download does.
"""

from .fetch import ProgressCallback, Store, endpoint, find_local, hf_cache_dir, is_offline, resolve, resolve_all
from .sources import (
    BASE_CHOICES,
    MODEL_FILES,
    TEXT_ENCODER_KEYS,
    TOKENIZER_KEYS,
    WEIGHTS_CHOICES,
    HubFile,
    ModelFile,
    format_bytes,
    model_file,
    task_model_keys,
)

__all__ = [
    "BASE_CHOICES", "MODEL_FILES", "TEXT_ENCODER_KEYS", "TOKENIZER_KEYS", "WEIGHTS_CHOICES", "HubFile", "ModelFile",
    "ProgressCallback", "Store", "endpoint", "find_local", "format_bytes", "hf_cache_dir", "is_offline",
    "model_file", "resolve", "resolve_all", "task_model_keys",
]
