"""API-format prompts (what ``POST /prompt`` takes) for the pack's nodes, one builder per kind of run.

Node ids are fixed strings so that tests can name the node whose outputs or errors they check. The graphs are the
pack's pipeline in its parts: E2PModelLoader + core VAELoader + E2PTaskConditioning -> E2PPerceive -> the task's
output node -> core SaveImage (MASK outputs through core MaskToImage).
"""

from __future__ import annotations

import json
from typing import Any

Prompt = dict[str, dict[str, Any]]

# Node ids used by every builder
MODEL, VAE, CONDITIONING, IMAGE, BATCH, PERCEIVE, POINTS, OUTPUT = "1", "2", "3", "4", "5", "6", "7", "8"
# SaveImage nodes, per task
SAVE = {
    "depth": {"depth_hint": "10", "depth": "12", "preview": "13"},
    "normal": {"normal_map": "10"},
    "matting": {"alpha": "12", "foreground": "13", "rgba": "14", "point_preview": "16"},
}


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def perceive_prompt(task: str, image: str, dit: str, vae: str, *, lora: str = "none", seed: int = 42,
                    resolution: int = 128, chunk_size: int = 4, batch: int = 1,
                    points: list[dict[str, float]] | None = None, prefix: str = "e2e") -> Prompt:
    """One task on one image file (repeated ``batch`` times as a video-like batch), every output saved."""
    prompt: Prompt = {
        MODEL: node("E2PModelLoader", model_name=dit, weight_dtype="default", lora_name=lora, lora_strength=1.0),
        VAE: node("VAELoader", vae_name=vae),
        CONDITIONING: node("E2PTaskConditioning", task=task, embeddings="auto"),
        IMAGE: node("LoadImage", image=image),
    }
    frames = [IMAGE, 0]
    if batch > 1:
        prompt[BATCH] = node("RepeatImageBatch", image=[IMAGE, 0], amount=batch)
        frames = [BATCH, 0]
    prompt[PERCEIVE] = node("E2PPerceive", model=[MODEL, 0], vae=[VAE, 0], conditioning=[CONDITIONING, 0],
                            image=frames, steps=1, seed=seed, resize_mode="aligned", resolution=resolution,
                            chunk_size=chunk_size, time_embedding="auto")
    if points is not None:
        prompt[POINTS] = node("E2PPointPrompt", image=[IMAGE, 0], positive_coords=json.dumps(points),
                              coords_space="pixels", mode="app", negative_coords="")
        prompt[PERCEIVE]["inputs"]["point_prompt"] = [POINTS, 0]
    save = SAVE[task]
    if task == "depth":
        prompt[OUTPUT] = node("E2PDepthOutput", prediction=[PERCEIVE, 0], polarity="near_white", normalization="none")
        _save(prompt, save["depth_hint"], [OUTPUT, 0], f"{prefix}/depth_hint")
        _save_mask(prompt, save["depth"], [OUTPUT, 1], f"{prefix}/depth")
        _save(prompt, save["preview"], [OUTPUT, 2], f"{prefix}/depth_preview")
    elif task == "normal":
        prompt[OUTPUT] = node("E2PNormalOutput", prediction=[PERCEIVE, 0], convention="controlnet_bae")
        _save(prompt, save["normal_map"], [OUTPUT, 0], f"{prefix}/normal_map")
    else:
        prompt[OUTPUT] = node("E2PMatteOutput", prediction=[PERCEIVE, 0])
        _save_mask(prompt, save["alpha"], [OUTPUT, 0], f"{prefix}/alpha")
        _save(prompt, save["foreground"], [OUTPUT, 1], f"{prefix}/foreground")
        _save(prompt, save["rgba"], [OUTPUT, 2], f"{prefix}/rgba")
        if points is not None:
            _save_mask(prompt, save["point_preview"], [POINTS, 1], f"{prefix}/point_preview")
    return prompt


# The FE2E graph: its own loader, conditioning and perceive; the outputs are the Edit2Perceive output nodes.
FE2E_SAVE = {"depth": "12", "depth_hint": "10", "normal_map": "11"}
NORMAL_OUTPUT = "9"


def fe2e_prompt(image: str, dit: str, vae: str, lora: str, *, resolution: int = 128, prefix: str = "fe2e") -> Prompt:
    """FE2E on one image file: depth AND normals from one E2PFE2EPerceive call, both saved."""
    prompt: Prompt = {
        MODEL: node("E2PFE2EModelLoader", model_name=dit, weight_dtype="default", lora_name=lora, lora_strength=1.0),
        VAE: node("VAELoader", vae_name=vae),
        CONDITIONING: node("E2PFE2EConditioning", connector=[MODEL, 1], prompt_cache="no_info.npz",
                           prompt_cache_path=""),
        IMAGE: node("LoadImage", image=image),
        PERCEIVE: node("E2PFE2EPerceive", model=[MODEL, 0], vae=[VAE, 0], conditioning=[CONDITIONING, 0],
                       image=[IMAGE, 0], steps=1, seed=1234, resolution_mode="longer_side", resolution=resolution,
                       resize_mode="aligned", chunk_size=4),
        OUTPUT: node("E2PDepthOutput", prediction=[PERCEIVE, 0], polarity="near_white", normalization="none"),
        NORMAL_OUTPUT: node("E2PNormalOutput", prediction=[PERCEIVE, 1], convention="controlnet_bae"),
    }
    _save(prompt, FE2E_SAVE["depth_hint"], [OUTPUT, 0], f"{prefix}/depth_hint")
    _save_mask(prompt, FE2E_SAVE["depth"], [OUTPUT, 1], f"{prefix}/depth")
    _save(prompt, FE2E_SAVE["normal_map"], [NORMAL_OUTPUT, 0], f"{prefix}/normal_map")
    return prompt


def _save(prompt: Prompt, node_id: str, image: list, prefix: str) -> None:
    prompt[node_id] = node("SaveImage", images=image, filename_prefix=prefix)


def _save_mask(prompt: Prompt, node_id: str, mask: list, prefix: str) -> None:
    """MASK -> MaskToImage (node id + "m") -> SaveImage (node id)."""
    prompt[node_id + "m"] = node("MaskToImage", mask=mask)
    _save(prompt, node_id, [node_id + "m", 0], prefix)
