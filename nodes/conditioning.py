"""Task conditioning: the task prompt as a ComfyUI CONDITIONING, from a cached embeddings file or a CLIP.

Edit2Perceive is conditioned on one fixed caption per task, so T5-XXL has to run once per prompt, ever:

* ``embeddings`` files (``e2p_core.prompts`` format, ``python -m e2p_core embed-prompts``) live in the pack's model
  folder ``models/e2p_prompts`` (folder_paths key ``e2p_prompts``; ``extra_model_paths.yaml`` may add more); a
  missing ``<task>.safetensors`` is made once from the text encoders in ``models/text_encoders`` (fetched there
  from the hub when absent), with ``transformers`` (which ComfyUI requires anyway);
* with a CLIP connected (core DualCLIPLoader, type flux), the encoded prompt is cached in
  ``e2p_prompts/clip_cache/``. The ``clip`` input is lazy and the cache key is the prompt plus the *recipe* of the
  CLIP branch in the graph (its node types and settings, and the size and date of the text-encoder files it names),
  so once the cache exists ComfyUI never runs the CLIP loader at all.

The CONDITIONING carries the task (``e2p_task``), so the perceive node cannot pair depth weights with a normal prompt.
"""

import hashlib
import json
import logging
import os
from pathlib import Path, PurePath

import folder_paths

from ..e2p_core.errors import CheckpointError, InputError
from ..e2p_core.prompts import FORMAT, T5_MAX_LENGTH, PromptEmbeddings, load_prompt_embeddings, save_prompt_embeddings
from ..e2p_core.tasks import TASKS, get_task
from .model_files import comfy_store, download_progress

logger = logging.getLogger(__name__)

PROMPTS_FOLDER = "e2p_prompts"
CLIP_CACHE_FOLDER = "clip_cache"
AUTO = "auto"
TASK_KEY = "e2p_task"  # conditioning entry naming the task
TRAINING_GUIDANCE = 1.0  # the reference's embedded_guidance
TEXT_ENCODER_FOLDER = "text_encoders"


def register_prompts_folder() -> None:
    """Add ``models/e2p_prompts`` to folder_paths, keeping paths extra_model_paths gave: Edit2Perceive's embeddings
    (.safetensors) and FE2E's cached empty prompt (no_info.npz)."""
    default = os.path.join(folder_paths.models_dir, PROMPTS_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(PROMPTS_FOLDER, ([], set()))
    folder_paths.folder_names_and_paths[PROMPTS_FOLDER] = ([*paths, default] if default not in paths else paths,
                                                           {".safetensors", ".npz"})


def embeddings_choices() -> list[str]:
    files = folder_paths.get_filename_list(PROMPTS_FOLDER)
    return [AUTO, *(name for name in files
                    if name.endswith(".safetensors") and PurePath(name).parts[0] != CLIP_CACHE_FOLDER)]


def load_task_embeddings(task: str, embeddings: str = AUTO, node_id: str | None = None) -> PromptEmbeddings:
    """The embeddings file ``embeddings`` (``auto``: ``<task>.safetensors``, made once when missing) from the
    e2p_prompts folders."""
    spec = get_task(task)
    name = f"{spec.name}.safetensors" if embeddings == AUTO else embeddings
    path = folder_paths.get_full_path(PROMPTS_FOLDER, name)
    if path is None and embeddings == AUTO:
        path = encode_task_prompt(spec.name, node_id)
    if path is None:
        raise CheckpointError(
            f"prompt embeddings {name!r} not found in {folder_paths.get_folder_paths(PROMPTS_FOLDER)}; make them once "
            f"with `python -m e2p_core embed-prompts --out-dir <ComfyUI>/models/{PROMPTS_FOLDER}`, or connect a CLIP "
            f"(DualCLIPLoader, type flux)")
    loaded = load_prompt_embeddings(path)
    if loaded.prompt is not None and loaded.prompt != spec.prompt:
        logger.warning("%s holds the prompt %r, not the %s training prompt %r", name, loaded.prompt, spec.name,
                       spec.prompt)
    return loaded


def encode_task_prompt(task: str, node_id: str | None = None) -> Path:
    """``<task>.safetensors`` in e2p_prompts, encoded once from the task's training caption with CLIP-L + T5: a set
    in models/text_encoders (ComfyUI's own files and tokenizers, fp8 T5 included), else the sources table's files
    downloaded there (clip_l 246 MB + t5xxl_fp16 9.8 GB + FLUX's tokenizers, with a progress bar and Cancel). Other
    models are unloaded first and the encoders are freed after, so the encoding has the memory to itself."""
    import comfy.model_management
    import torch

    from ..e2p_core.prompts import encode_prompts
    from ..e2p_core.text_encoders import automatic_encoder_source

    encoders = automatic_encoder_source(comfy_store(download_progress(0, node_id))).locate()
    comfy.model_management.unload_all_models()
    device = comfy.model_management.text_encoder_device()
    logger.info("Edit2Perceive: encoding the %s prompt once with %s on %s", task, encoders.t5.weights.name, device)
    (embeddings,) = encode_prompts([get_task(task).prompt], encoders, device, torch.bfloat16)  # the reference's dtype
    comfy.model_management.soft_empty_cache()
    target = Path(folder_paths.get_folder_paths(PROMPTS_FOLDER)[0]) / f"{task}.safetensors"
    save_prompt_embeddings(embeddings, target)
    return target


def encode_with_clip(clip, text: str) -> PromptEmbeddings:
    """FLUX text conditioning as Edit2Perceive was trained: T5 padded to 512 tokens, CLIP-L pooled output."""
    tokens = clip.tokenize(text, tokenizer_options={"t5xxl_min_length": T5_MAX_LENGTH})
    if not {"l", "t5xxl"} <= set(tokens):
        raise InputError(f"the CLIP encodes with {sorted(tokens)}; Edit2Perceive needs FLUX's CLIP-L + T5-XXL "
                         f"(DualCLIPLoader with type 'flux')")
    prompt_embeds, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return PromptEmbeddings(prompt_embeds, pooled, text)


def clip_recipe(graph: dict | None, node_id: str | None, input_name: str = "clip") -> list | None:
    """What produces the ``input_name`` input of ``node_id`` in the API ``graph``: node types and settings,
    recursively, with size and date of text-encoder files; None when the input is not linked (or no graph)."""
    if not graph or node_id is None:
        return None
    link = graph.get(str(node_id), {}).get("inputs", {}).get(input_name)
    return _node_recipe(graph, link[0]) + [link[1]] if _is_link(link) else None


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _node_recipe(graph: dict, node_id: str) -> list:
    node = graph[node_id]
    inputs = {name: _node_recipe(graph, value[0]) + [value[1]] if _is_link(value) else _file_stamp(value)
              for name, value in sorted(node.get("inputs", {}).items())}
    return [node["class_type"], inputs]


def _file_stamp(value):
    path = folder_paths.get_full_path(TEXT_ENCODER_FOLDER, value) if isinstance(value, str) and value else None
    if path is None:
        return value
    stat = os.stat(path)  # a replaced file under the same name changes the key
    return [value, stat.st_size, stat.st_mtime_ns]


def clip_cache_name(text: str, recipe: list) -> str:
    identity = json.dumps({"format": FORMAT, "prompt": text, "clip": recipe}, sort_keys=True)
    return f"{CLIP_CACHE_FOLDER}/{hashlib.sha256(identity.encode('utf-8')).hexdigest()[:32]}.safetensors"


def prompt_text(task: str, prompt_override: str) -> str:
    return prompt_override.strip() or get_task(task).prompt


def _clip_cache(text: str, graph: dict | None, node_id: str | None) -> tuple[str | None, str | None]:
    """(cache file name, its full path if it exists) of ``text`` encoded by the CLIP linked to ``node_id``;
    (None, None) when no CLIP is linked."""
    recipe = clip_recipe(graph, node_id)
    if recipe is None:
        return None, None
    cache_name = clip_cache_name(text, recipe)
    return cache_name, folder_paths.get_full_path(PROMPTS_FOLDER, cache_name)


def clip_needed(task: str, prompt_override: str, graph: dict | None, node_id: str | None) -> bool:
    """True when a CLIP is linked and its result for this prompt is not cached yet (lazy-input check)."""
    cache_name, cached = _clip_cache(prompt_text(task, prompt_override), graph, node_id)
    return cache_name is not None and cached is None


def task_embeddings(task: str, embeddings: str = AUTO, clip=None, prompt_override: str = "",
                    graph: dict | None = None, node_id: str | None = None) -> PromptEmbeddings:
    """The task's prompt embeddings: from the CLIP cache or the CLIP when a CLIP is linked, else from the file."""
    text = prompt_text(task, prompt_override)
    cache_name, cached = _clip_cache(text, graph, node_id)
    if cached is not None:
        return load_prompt_embeddings(cached)
    if cache_name is None and clip is None:
        return load_task_embeddings(task, embeddings, node_id)
    if clip is None:
        raise InputError("the CLIP input is linked but was not evaluated; run the workflow again")
    encoded = encode_with_clip(clip, text)
    if cache_name is not None:
        target = Path(folder_paths.get_folder_paths(PROMPTS_FOLDER)[0]) / cache_name
        save_prompt_embeddings(encoded, target)
        logger.info("Edit2Perceive: cached the %s prompt encoding in %s", task, target)
    return encoded


def to_conditioning(task: str, embeddings: PromptEmbeddings) -> list:
    """A ComfyUI CONDITIONING ([[T5 tokens [1,L,D], {...}]]) that also names the task."""
    extras = {"pooled_output": embeddings.pooled_prompt_embeds, "guidance": TRAINING_GUIDANCE, TASK_KEY: task}
    return [[embeddings.prompt_embeds, extras]]


def conditioning_to_prompt(conditioning: list) -> tuple[str, PromptEmbeddings, float]:
    """(task, prompt embeddings, guidance) from a CONDITIONING made by :class:`E2PTaskConditioning`."""
    if not conditioning:
        raise InputError("the CONDITIONING is empty; connect 'Edit2Perceive Task Conditioning'")
    if len(conditioning) > 1:
        logger.warning("the CONDITIONING has %d entries; Edit2Perceive uses the first", len(conditioning))
    prompt_embeds, extras = conditioning[0]
    task = extras.get(TASK_KEY)
    if task not in TASKS or extras.get("pooled_output") is None:
        raise InputError("this CONDITIONING does not say which Edit2Perceive task it is for; make it with "
                         "'Edit2Perceive Task Conditioning'")
    return task, PromptEmbeddings(prompt_embeds, extras["pooled_output"]), float(extras.get("guidance",
                                                                                           TRAINING_GUIDANCE))


# Inputs shared with the all-in-one nodes.
EMBEDDINGS_TOOLTIP = (f"Prompt embeddings in models/{PROMPTS_FOLDER}; 'auto' = <task>.safetensors, made once when "
                      "missing with CLIP-L + T5 from models/text_encoders (downloaded there if absent: 10 GB). "
                      "Ignored when a CLIP is connected.")
CLIP_INPUT = ("CLIP", {"lazy": True, "tooltip": (
    "Optional FLUX text encoders (DualCLIPLoader, type flux). The prompt is encoded once and cached in "
    f"models/{PROMPTS_FOLDER}/{CLIP_CACHE_FOLDER}; later runs never load the encoders.")})


class E2PTaskConditioning:
    DESCRIPTION = (
        "The task prompt of Edit2Perceive as a CONDITIONING: read from a precomputed embeddings file (no T5 needed), "
        "or encoded once with a connected FLUX CLIP and cached on disk. The conditioning names its task, so the "
        "perceive node knows what to predict."
    )
    CATEGORY = "Edit2Perceive/conditioning"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("T5 + CLIP-pooled embeddings of the task prompt, with guidance 1.0 and the task name.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "task": (list(TASKS), {"default": "depth", "tooltip": "What to predict: depth, normal or matting "
                                                                      "(alpha). Must match the loaded LoRA."}),
                "embeddings": (embeddings_choices(), {"default": AUTO, "tooltip": EMBEDDINGS_TOOLTIP}),
            },
            "optional": {
                "clip": CLIP_INPUT,
                "prompt_override": ("STRING", {
                    "default": "", "multiline": True,
                    "tooltip": "Only with a CLIP: a prompt to encode instead of the task's training caption (leave "
                               "empty; the model was trained with the caption)."}),
            },
            "hidden": {"graph": "PROMPT", "node_id": "UNIQUE_ID"},
        }

    def check_lazy_status(self, task, embeddings, clip=None, prompt_override="", graph=None, node_id=None):
        return ["clip"] if clip is None and clip_needed(task, prompt_override, graph, node_id) else []

    def encode(self, task, embeddings, clip=None, prompt_override="", graph=None, node_id=None):
        return (to_conditioning(task, task_embeddings(task, embeddings, clip, prompt_override, graph, node_id)),)
