"""Builds the example workflows in ``workflows/`` (UI format) and their same-name ``.jpg`` thumbnails.

    .venv/bin/python -m tests.e2e.build_workflows [--out workflows] [--only NAME ...]

The graphs are written down here as nodes (type, widget values by name, layout column) and links; a real ComfyUI
server with the pack serves the real frontend, which creates the nodes from the server's node definitions, links
them and serialises the graph exactly as "Save" would (``app.graph.serialize()``). The thumbnail is a screenshot
of that graph in headless Chromium: it shows the workflow, not a generated picture. The Load Image nodes show
pictures made from numbers (``pictures.py``), which the point picker of the matting workflow shows too;
``e2p_point_picker.jpg`` is a close-up of that node with its points and the point map the model will see.

The model file names are the ones users have: FLUX.1 Kontext [dev] with the Edit2Perceive task LoRAs (as released,
kohya naming), the Flux VAE ``ae.safetensors``, FLUX.1 [dev] with its two text encoders, and jasperai's FLUX.1 [dev]
ControlNets for depth and surface normals (diffusers format, which the core ControlNetLoader reads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from e2p_core.hub import MODEL_FILES

from .comfy_server import REPO_ROOT, ComfyServer
from .frontend import Frontend
from .pictures import background, scene

KONTEXT = MODEL_FILES["kontext"].name
FLUX_VAE = MODEL_FILES["vae"].name
FLUX_DEV = "flux1-dev.safetensors"
CLIP_L, T5XXL = MODEL_FILES["clip_l"].name, MODEL_FILES["t5xxl_fp16"].name
LORAS = {task: MODEL_FILES[f"{task}_lora"].name for task in ("depth", "normal", "matting")}  # as released
CONTROLNETS = {"depth": "jasperai_flux.1-dev-controlnet-depth.safetensors",
               "normal": "jasperai_flux.1-dev-controlnet-surface-normals.safetensors"}
EXAMPLE_IMAGE, BACKGROUND_IMAGE = "e2p_example.png", "e2p_background.png"
SUBJECT_CLICKS = '[{"x": 0.5, "y": 0.55}]'  # normalized: the middle of the picture, a little below the centre
PICKED_CLICKS = '[{"x": 0.28, "y": 0.5}, {"x": 0.42, "y": 0.64}]'  # two clicks on the subject of pictures.scene
PICTURE_WH = (640, 480)  # the example pictures' size
POINT_PICKER_SHOT = "e2p_point_picker.jpg"

COLUMN_WIDTH, ROW_GAP = 460, 40
LOAD_IMAGE_SIZE = (320, 400)  # room for the picture's preview, which appears only once the picture has loaded


@dataclass
class Node:
    key: str
    type: str
    column: int
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    band: int = 0  # 0: the Edit2Perceive part (top), 1: what uses its result (below)
    size: tuple[int, int] | None = None  # width, height; None: the frontend's default for the node


@dataclass
class Workflow:
    nodes: list[Node]
    links: list[tuple[str, int, str, str]]  # (from node key, output slot, to node key, input name)


MODELS_NOTE = (
    f"**Models** (ComfyUI `models/` folders): `diffusion_models/{KONTEXT}`, `loras/` the Edit2Perceive task LoRA "
    f"(released in kohya naming; any naming the pack knows works), `vae/{FLUX_VAE}`, and the task prompt embeddings "
    "`e2p_prompts/<task>.safetensors` made once with `python -m e2p_core embed-prompts --out-dir models/e2p_prompts` "
    "(or connect a DualCLIPLoader to the conditioning's `clip` input: the prompt is encoded once and cached).\n\n"
    "**Downloads**: the Edit2Perceive loaders fetch what is missing when the workflow first runs, from the Hugging "
    f"Face hub into those folders: `{KONTEXT}` {MODEL_FILES['kontext'].size_text} (gated: accept the licence on "
    f"huggingface.co/{MODEL_FILES['kontext'].hub.repo} and start ComfyUI with your `HF_TOKEN`), the task LoRA "
    f"{MODEL_FILES['depth_lora'].size_text} ({MODEL_FILES['depth_lora'].hub.repo}), `{FLUX_VAE}` "
    f"{MODEL_FILES['vae'].size_text}. Or ahead of time: `python -m e2p_core download --task <task> --comfyui "
    "<ComfyUI folder>`."
)


def _note(text: str, column: int) -> Node:
    return Node("note", "MarkdownNote", column, {"text": text}, size=(520, 560))


def _perceive_chain(task: str, lora: str) -> list[Node]:
    return [
        Node("image", "LoadImage", 0, {"image": EXAMPLE_IMAGE}, size=LOAD_IMAGE_SIZE),
        Node("model", "E2PModelLoader", 0, {"model_name": KONTEXT, "weight_dtype": "default", "lora_name": lora,
                                             "lora_strength": 1.0}),
        Node("vae", "E2PVAELoader", 0, {"vae_name": FLUX_VAE}),
        Node("conditioning", "E2PTaskConditioning", 1, {"task": task, "embeddings": "auto"}),
        Node("perceive", "E2PPerceive", 2, {"steps": 1, "seed": 42, "resize_mode": "aligned", "resolution": 768,
                                            "chunk_size": 4, "time_embedding": "auto"}),
    ]


_PERCEIVE_LINKS = [("model", 0, "perceive", "model"), ("vae", 0, "perceive", "vae"),
                   ("conditioning", 0, "perceive", "conditioning")]


def controlnet_workflow(task: str) -> Workflow:
    """Edit2Perceive depth or normals as the hint of a FLUX.1 [dev] ControlNet (core nodes)."""
    if task == "depth":
        output = Node("output", "E2PDepthOutput", 3, {"polarity": "near_white", "normalization": "none"})
        prompt = "a cozy reading corner with warm evening light, wooden shelves, photorealistic"
        hint = "The hint is **near = white**, as depth ControlNets expect."
    else:
        output = Node("output", "E2PNormalOutput", 3, {"convention": "controlnet_bae"})
        prompt = "a marble statue in a museum hall, soft daylight, photorealistic"
        hint = ("Normals in the ControlNet *normal_bae* convention (+x left, +y up, +z toward the camera); choose "
                "`opengl` or `directx` for ControlNets trained on those.")
    note = (f"# Edit2Perceive {task} \u2192 FLUX.1 [dev] ControlNet\n\n{MODELS_NOTE}\n\n**Generation**: "
            f"`diffusion_models/{FLUX_DEV}`, `text_encoders/{CLIP_L}` + `{T5XXL}`, and a FLUX.1 [dev] {task} "
            f"ControlNet in `controlnet/` (here jasperai's, saved as `{CONTROLNETS[task]}`).\n\n{hint} The image is "
            "scaled to 1 megapixel first, so the hint and the latent have the same size.")
    nodes = [
        *_perceive_chain(task, LORAS[task]),
        Node("scaled", "ImageScaleToTotalPixels", 1, {"upscale_method": "lanczos", "megapixels": 1.0}),
        output,
        Node("hint_preview", "PreviewImage", 3, title="ControlNet hint"),
        _note(note, 4),
        Node("unet", "UNETLoader", 0, {"unet_name": FLUX_DEV, "weight_dtype": "default"}, band=1),
        Node("clip", "DualCLIPLoader", 0, {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux"}, band=1),
        Node("controlnet", "ControlNetLoader", 0, {"control_net_name": CONTROLNETS[task]}, band=1),
        Node("positive", "CLIPTextEncode", 1, {"text": prompt}, title="Prompt", band=1),
        Node("negative", "CLIPTextEncode", 1, {"text": ""}, title="Negative (unused at cfg 1)", band=1),
        Node("guidance", "FluxGuidance", 2, {"guidance": 3.5}, band=1),
        Node("apply", "ControlNetApplyAdvanced", 2, {"strength": 0.7, "start_percent": 0.0, "end_percent": 0.8},
             band=1),
        Node("latent", "VAEEncode", 3, band=1),
        Node("sampler", "KSampler", 3, {"seed": 0, "control_after_generate": "fixed", "steps": 20, "cfg": 1.0,
                                        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}, band=1),
        Node("decode", "VAEDecode", 4, band=1),
        Node("save", "SaveImage", 4, {"filename_prefix": f"e2p_{task}_controlnet"}, band=1),
    ]
    links = [
        *_PERCEIVE_LINKS, ("image", 0, "scaled", "image"), ("scaled", 0, "perceive", "image"),
        ("perceive", 0, "output", "prediction"), ("output", 0, "hint_preview", "images"),
        ("clip", 0, "positive", "clip"), ("clip", 0, "negative", "clip"), ("positive", 0, "guidance", "conditioning"),
        ("guidance", 0, "apply", "positive"), ("negative", 0, "apply", "negative"),
        ("controlnet", 0, "apply", "control_net"), ("output", 0, "apply", "image"), ("vae", 0, "apply", "vae"),
        ("scaled", 0, "latent", "pixels"), ("vae", 0, "latent", "vae"),
        ("unet", 0, "sampler", "model"), ("apply", 0, "sampler", "positive"), ("apply", 1, "sampler", "negative"),
        ("latent", 0, "sampler", "latent_image"), ("sampler", 0, "decode", "samples"), ("vae", 0, "decode", "vae"),
        ("decode", 0, "save", "images"),
    ]
    return Workflow(nodes, links)


def matting_composite_workflow() -> Workflow:
    """A point-prompted matte of the subject, composited over a new background (core ImageCompositeMasked)."""
    note = ("# Edit2Perceive matting \u2192 new background\n\n" + MODELS_NOTE + "\n\n**Clicks**: "
            "`positive_coords` takes a JSON list of points on the subject, `[{\"x\": .., \"y\": ..}]`, in pixels or "
            "normalized 0..1; click on the picture in the node to add a point, click a point to remove it (the "
            "glow is the point map the model sees). KJNodes' *Points Editor* `positive_coords` output can be linked "
            "to it instead. Negative clicks are ignored (the model was trained with positive points only).\n\nThe "
            "background is scaled and "
            "centre-cropped to the subject's size; the alpha matte (1 = foreground) is the composite's mask. The "
            "cut-out is also saved as an RGBA PNG.")
    nodes = [
        *_perceive_chain("matting", LORAS["matting"]),
        Node("points", "E2PPointPrompt", 1, {"positive_coords": PICKED_CLICKS, "coords_space": "normalized",
                                             "mode": "app", "negative_coords": ""}, size=(400, 620)),
        Node("point_map", "MaskToImage", 2),
        Node("point_preview", "PreviewImage", 2, title="Point map"),
        Node("matte", "E2PMatteOutput", 3),
        Node("save_rgba", "SaveImage", 3, {"filename_prefix": "e2p_cutout"}, title="Cut-out (RGBA)"),
        _note(note, 4),
        Node("background", "LoadImage", 0, {"image": BACKGROUND_IMAGE}, title="New background", band=1,
             size=LOAD_IMAGE_SIZE),
        Node("size", "GetImageSize", 1, band=1),
        Node("fit", "ImageScale", 2, {"upscale_method": "lanczos", "crop": "center"}, title="Background to size",
             band=1),
        Node("composite", "ImageCompositeMasked", 3, {"x": 0, "y": 0, "resize_source": False}, band=1),
        Node("save", "SaveImage", 4, {"filename_prefix": "e2p_composite"}, band=1),
    ]
    links = [
        *_PERCEIVE_LINKS, ("image", 0, "perceive", "image"), ("image", 0, "points", "image"),
        ("points", 0, "perceive", "point_prompt"), ("points", 1, "point_map", "mask"),
        ("point_map", 0, "point_preview", "images"), ("perceive", 0, "matte", "prediction"),
        ("matte", 2, "save_rgba", "images"), ("image", 0, "size", "image"), ("background", 0, "fit", "image"),
        ("size", 0, "fit", "width"), ("size", 1, "fit", "height"), ("fit", 0, "composite", "destination"),
        ("image", 0, "composite", "source"), ("matte", 0, "composite", "mask"), ("composite", 0, "save", "images"),
    ]
    return Workflow(nodes, links)


def all_tasks_workflow() -> Workflow:
    """Depth, normals and a matte of one image with the all-in-one nodes; one base model, three core LoRA loaders."""
    common = {"embeddings": "auto", "resolution": 768}
    note = ("# Edit2Perceive: all three tasks from one image\n\n" + MODELS_NOTE + "\n\nOne base model, the three "
            "task LoRAs applied by core *LoraLoaderModelOnly* nodes (ComfyUI shares the base weights); core "
            "loaders do not download: fetch the three LoRAs first with `python -m e2p_core download --task all "
            f"--comfyui <ComfyUI folder>` (3 \u00d7 {MODEL_FILES['depth_lora'].size_text}). The "
            "all-in-one nodes run one step with seed 42 at 768 px and return the input's size.")
    nodes = [
        Node("image", "LoadImage", 0, {"image": EXAMPLE_IMAGE}, size=LOAD_IMAGE_SIZE),
        Node("model", "E2PModelLoader", 0, {"model_name": KONTEXT, "weight_dtype": "default", "lora_name": "none",
                                             "lora_strength": 1.0}),
        Node("vae", "E2PVAELoader", 0, {"vae_name": FLUX_VAE}),
        *(Node(f"lora_{task}", "LoraLoaderModelOnly", 1, {"lora_name": LORAS[task], "strength_model": 1.0})
          for task in ("depth", "normal", "matting")),
        Node("depth", "E2PDepthAllInOne", 2, {**common, "polarity": "near_white", "normalization": "none"}),
        Node("normal", "E2PNormalAllInOne", 2, {**common, "convention": "controlnet_bae"}),
        Node("matting", "E2PMattingAllInOne", 2, {**common, "positive_coords": SUBJECT_CLICKS,
                                                  "coords_space": "normalized", "negative_coords": ""}),
        Node("save_depth", "SaveImage", 3, {"filename_prefix": "e2p_depth"}, title="Depth (ControlNet hint)"),
        Node("depth_preview", "PreviewImage", 3, title="Depth (colourised)"),
        Node("save_normal", "SaveImage", 3, {"filename_prefix": "e2p_normal"}, title="Normals"),
        Node("save_rgba", "SaveImage", 3, {"filename_prefix": "e2p_cutout"}, title="Cut-out (RGBA)"),
        _note(note, 4),
    ]
    links = [("model", 0, f"lora_{task}", "model") for task in ("depth", "normal", "matting")]
    for task in ("depth", "normal", "matting"):
        links += [(f"lora_{task}", 0, task, "model"), ("vae", 0, task, "vae"), ("image", 0, task, "image")]
    links += [("depth", 0, "save_depth", "images"), ("depth", 2, "depth_preview", "images"),
              ("normal", 0, "save_normal", "images"), ("matting", 2, "save_rgba", "images")]
    return Workflow(nodes, links)


def fe2e_workflow() -> Workflow:
    """FE2E: depth AND normals from one perceive call, each through the pack's existing output node."""
    dit, vae, lora = (MODEL_FILES[key] for key in ("fe2e_dit", "fe2e_vae", "fe2e_lora"))
    note = (
        "# FE2E: depth and normals from one pass\n\n"
        f"[FE2E](https://github.com/AMAP-ML/FE2E) (Step1X-Edit + one LoRA) predicts depth AND surface normals in one "
        "DiT call; *FE2E Perceive* returns both, and the Edit2Perceive output nodes take them unchanged.\n\n"
        f"**Models** (ComfyUI `models/` folders): `diffusion_models/{dit.name}` (Step1X-Edit: DiT + connector; "
        f"{dit.size_text}, or its FP8 variant), `loras/{lora.name}` (FE2E's LoRA, {lora.size_text}, "
        f"{lora.hub.repo}), `vae/{vae.name}` (Step1X-Edit's VAE, {vae.size_text}). The loaders fetch what is "
        "missing from the Hugging Face hub when the workflow first runs (or ahead of time: `python -m e2p_core "
        "download --task fe2e --comfyui <ComfyUI folder>`).\n\n"
        "**Prompt cache**: FE2E runs with an empty prompt whose Qwen2.5-VL embedding is cached: download "
        "`latent/no_info.npz` from the FE2E GitHub repository into `models/e2p_prompts/` (or give its path in "
        "*FE2E Conditioning*). Qwen never runs.\n\n"
        "**Settings**: one step, seed 1234, FE2E's size buckets (e.g. up to 1024\u00d7768 is processed at "
        "1024\u00d7768); the outputs have the input's exact size. Depth hint near = white; normals in the "
        "ControlNet *normal_bae* convention.")
    nodes = [
        Node("image", "LoadImage", 0, {"image": EXAMPLE_IMAGE}, size=LOAD_IMAGE_SIZE),
        Node("model", "E2PFE2EModelLoader", 0, {"model_name": dit.name, "weight_dtype": "default",
                                                 "lora_name": lora.name, "lora_strength": 1.0}),
        Node("vae", "E2PVAELoader", 0, {"vae_name": vae.name}),
        Node("conditioning", "E2PFE2EConditioning", 1, {"prompt_cache": "no_info.npz", "prompt_cache_path": ""}),
        Node("perceive", "E2PFE2EPerceive", 2, {"steps": 1, "seed": 1234, "resolution_mode": "buckets",
                                                "resolution": 768, "resize_mode": "aligned", "chunk_size": 4}),
        Node("depth", "E2PDepthOutput", 3, {"polarity": "near_white", "normalization": "none"}),
        Node("normal", "E2PNormalOutput", 3, {"convention": "controlnet_bae"}),
        Node("save_depth", "SaveImage", 4, {"filename_prefix": "fe2e_depth"}, title="Depth (ControlNet hint)"),
        Node("depth_preview", "PreviewImage", 4, title="Depth (colourised)"),
        Node("save_normal", "SaveImage", 4, {"filename_prefix": "fe2e_normal"}, title="Normals"),
        _note(note, 5),
    ]
    links = [
        ("model", 0, "perceive", "model"), ("model", 1, "conditioning", "connector"), ("vae", 0, "perceive", "vae"),
        ("conditioning", 0, "perceive", "conditioning"), ("image", 0, "perceive", "image"),
        ("perceive", 0, "depth", "prediction"), ("perceive", 1, "normal", "prediction"),
        ("depth", 0, "save_depth", "images"), ("depth", 2, "depth_preview", "images"),
        ("normal", 0, "save_normal", "images"),
    ]
    return Workflow(nodes, links)


WORKFLOWS = {
    "e2p_depth_controlnet": controlnet_workflow("depth"),
    "e2p_normal_controlnet": controlnet_workflow("normal"),
    "e2p_matting_composite": matting_composite_workflow(),
    "e2p_all_tasks": all_tasks_workflow(),
    "fe2e_depth_normal": fe2e_workflow(),
}

# In the page: create the nodes from the server's definitions, set widgets, link, lay out by column, serialise.
_BUILD_JS = r"""
async ({nodes, links, columnWidth, rowGap}) => {
  const app = window.app, L = window.LiteGraph;
  app.graph.clear();
  const byKey = {};
  for (const spec of nodes) {
    const node = L.createNode(spec.type);
    if (!node) throw new Error(`unknown node type ${spec.type}`);
    if (spec.title) node.title = spec.title;
    app.graph.add(node);
    if (spec.size) node.size = [...spec.size];
    for (const [name, value] of Object.entries(spec.widgets)) {
      const widget = (node.widgets ?? []).find(w => w.name === name);
      if (!widget) throw new Error(`${spec.type} has no widget ${name}`);
      widget.value = value;
    }
    byKey[spec.key] = node;
  }
  for (const [from, slot, to, inputName] of links) {
    const target = byKey[to], input = target.findInputSlot(inputName);
    if (input < 0) throw new Error(`${target.type} has no input ${inputName}`);
    if (!byKey[from].connect(slot, target, input)) throw new Error(`cannot link ${from}:${slot} to ${to}.${inputName}`);
  }
  let bandTop = 0;
  for (const band of [0, 1]) {
    const columnY = {};
    for (const spec of nodes.filter(n => n.band === band)) {
      const node = byKey[spec.key], y = columnY[spec.column] ?? bandTop;
      node.pos = [spec.column * columnWidth, y];
      columnY[spec.column] = y + node.size[1] + rowGap + L.NODE_TITLE_HEIGHT;
    }
    bandTop = Math.max(bandTop, ...Object.values(columnY)) + 2 * rowGap;
  }
  app.graph.setDirtyCanvas(true, true);
  return JSON.parse(JSON.stringify(app.graph.serialize()));  // as saved to a file: no undefined fields
}
"""


# In the page: the point prompt node zoomed in at the middle of the view -> its bounding box in client pixels.
_SHOW_POINT_NODE_JS = r"""
async (scale) => {
  const node = (app.graph.nodes ?? app.graph._nodes).find(n => n.type === 'E2PPointPrompt');
  app.canvas.ds.scale = scale;
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  await new Promise(resolve => setTimeout(resolve, 2000));  // the picture and the point map load asynchronously
  const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
  const box = app.canvas.canvas.getBoundingClientRect();
  return {x: box.left + x, y: box.top + y, width: node.size[0] * scale,
          height: (node.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * scale};
}
"""


def build(out_dir: Path, only: set[str] | None = None) -> None:
    base_dir = Path(tempfile.mkdtemp(prefix="e2p-build-workflows-"))
    try:
        server = ComfyServer(base_dir)
        Image.fromarray(scene(*PICTURE_WH)).save(base_dir / "input" / EXAMPLE_IMAGE)
        Image.fromarray(background(*PICTURE_WH)).save(base_dir / "input" / BACKGROUND_IMAGE)
        with server, Frontend(server.url, viewport=(2400, 1500)) as frontend:
            for name, workflow in WORKFLOWS.items():
                if only and name not in only:
                    continue
                spec = {"nodes": [vars(node) for node in workflow.nodes], "links": workflow.links,
                        "columnWidth": COLUMN_WIDTH, "rowGap": ROW_GAP}
                graph = frontend.page.evaluate(_BUILD_JS, spec)
                graph["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"edit2perceive/workflows/{name}"))  # stable diffs
                path = out_dir / f"{name}.json"
                path.write_text(json.dumps(graph, indent=2) + "\n")
                loaded = frontend.load(graph)  # reload from JSON, as a user opening the file
                if loaded.missing_types or loaded.load_errors:
                    raise RuntimeError(f"{name}: missing {loaded.missing_types}, errors {loaded.load_errors}")
                frontend.page.wait_for_timeout(2000)  # pictures and the point picker's map load asynchronously
                frontend.screenshot_graph(out_dir / f"{name}.jpg")
                print(f"wrote {path} and its thumbnail ({len(workflow.nodes)} nodes)")
                if name == "e2p_matting_composite":
                    box = frontend.page.evaluate(_SHOW_POINT_NODE_JS, 1.6)
                    frontend.page.screenshot(path=out_dir / POINT_PICKER_SHOT, type="jpeg", quality=88, clip=box)
                    print(f"wrote {out_dir / POINT_PICKER_SHOT}")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "workflows")
    parser.add_argument("--only", nargs="+", choices=sorted(WORKFLOWS), help="rebuild only these workflows")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.out, set(args.only or ()))


if __name__ == "__main__":
    main()
