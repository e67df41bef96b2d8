"""The published training sets in the reference's processed layouts (E2P-SPEC §4.4-§4.6, §5).

Each :class:`Source` knows its task, how to find its (image, target) pairs by scanning its root (when no list file is
given; the scan reproduces the paths of the reference's list files, which are relative to the same root), how to read
its target, and whether the frames get the Virtual KITTI bottom-centre crop.

=====================  ==========================================================================================
kind                   layout under ``root`` → target conversion
=====================  ==========================================================================================
hypersim_depth         ``ai_XXX_YYY/rgb_cam_NN_frFFFF.png`` + ``ai_XXX_YYY/depth_plane_cam_NN_frFFFF.png``:
                       uint16 mm → m (/1000), valid 1e-3 < d < 65.5 m (uint16 wraps above 65.535 m)
vkitti_depth           ``rgb/SceneXX/<var>/frames/rgb/Camera_k/rgb_NNNNN.jpg`` +
                       ``depth/SceneXX/<var>/frames/depth/Camera_k/depth_NNNNN.png``: uint16 cm → m (/100),
                       valid 0.1 < d < 80 m; image and depth cropped bottom-centre to 1216×352 first
hypersim_normal        ``[train/]ai_…/rgb_cam_NN_frFFFF.png`` + ``normal_cam_cam_NN_frFFFF.npy`` (float [H,W,3],
                       OpenGL camera frame): x negated into the E2P frame
interiorverse_normal   ``<scene>/<id>_img.png`` + ``<scene>/<id>_normal.npy``: as Hypersim (the reference loader
                       negates x of every normal ``.npy``)
sintel_normal          ``<scene>/frame_NNNN_img.png`` + ``<scene>/frame_NNNN_normal.npy``: as Hypersim
comp1k                 ``Training_set/merged/<name>_<k>.png`` + ``Training_set/alpha/<name>.jpg``
distinctions646        ``Train_comp/merged/<name>.png_<k>.png`` + ``Train_comp/alpha/<name>.png``
am2k                   ``train/original/m_<id>.jpg`` + ``train/mask/m_<id>.png``
coco_matte             ``COCO_Path/train2017/<id>.jpg`` + ``alpha/<id>_<class>_<nn>.png`` (one sample per alpha)
=====================  ==========================================================================================

Depth PNGs are resized with PIL's default filter (bicubic) before the validity range is applied, as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .listing import Pair, pair_up
from .readers import depth_validity, read_alpha, read_depth_png, read_normals_npy

ALPHA_SUFFIXES = ("", ".png", ".jpg")  # Comp-1k alphas are <name>.jpg, Distinctions-646 alphas keep <name>.png


@dataclass(frozen=True)
class Source:
    """How to list and read one kind of dataset."""

    task: str
    scan: Callable[[Path], list[Pair]]  # root → sorted (image, target) pairs
    read_target: Callable[[Path, tuple[int, int]], Any]  # (path, size_hw) → depth (metres, valid) / normals / alpha
    layout: str  # for error messages
    crop: bool = False  # Virtual KITTI's bottom-centre crop on image and target


def _read_depth(path: Path, size_hw: tuple[int, int], units_per_metre: float, valid_m: tuple[float, float],
                crop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    depth_m = read_depth_png(path, size_hw, units_per_metre, crop=crop)
    return depth_m, depth_validity(depth_m, *valid_m)


def _scan_beside(root: Path, image_glob: str, target_name: Callable[[str], str]) -> list[Pair]:
    """Pairs whose target lies next to the image, named ``target_name(image file name)``."""
    return pair_up(root.rglob(image_glob), lambda image: [image.with_name(target_name(image.name))], str(root))


def _vkitti_depth_path(root: Path, image: Path) -> Path:
    """``rgb/S/v/frames/rgb/Camera_k/rgb_N.jpg`` → ``depth/S/v/frames/depth/Camera_k/depth_N.png``."""
    parts = ["depth" if part == "rgb" else part for part in image.relative_to(root).parts[:-1]]
    return root.joinpath(*parts, "depth_" + image.stem.removeprefix("rgb_") + ".png")


def _scan_vkitti(root: Path) -> list[Pair]:
    return pair_up((root / "rgb").rglob("rgb_*.jpg"), lambda image: [_vkitti_depth_path(root, image)], str(root))


def _scan_merged(root: Path, folder: str) -> list[Pair]:
    """Comp-1k / Distinctions-646: ``<folder>/merged/<name>_<k>.png`` with ``<folder>/alpha/<name>[.png|.jpg]``."""
    def alphas(image: Path) -> list[Path]:
        name = image.stem.rsplit("_", 1)[0]
        return [root / folder / "alpha" / (name + suffix) for suffix in ALPHA_SUFFIXES]

    return pair_up((root / folder / "merged").glob("*.png"), alphas, str(root))


def _scan_am2k(root: Path) -> list[Pair]:
    return pair_up((root / "train" / "original").glob("*.jpg"),
                   lambda image: [root / "train" / "mask" / (image.stem + ".png")], str(root))


def _scan_coco(root: Path) -> list[Pair]:
    def images(alpha: Path) -> list[Path]:
        return [root / "COCO_Path" / "train2017" / (alpha.stem.split("_", 1)[0] + ".jpg")]

    return pair_up((root / "alpha").glob("*.png"), images, str(root), anchor_is_image=False)


def _hypersim_depth_name(name: str) -> str:
    return name.replace("rgb_", "depth_plane_", 1)


def _hypersim_normal_name(name: str) -> str:
    return name.replace("rgb_", "normal_cam_", 1).removesuffix(".png") + ".npy"


def _img_normal_name(name: str) -> str:
    return name.removesuffix("_img.png") + "_normal.npy"


SOURCES: dict[str, Source] = {
    "hypersim_depth": Source(
        "depth",
        partial(_scan_beside, image_glob="rgb_cam_*.png", target_name=_hypersim_depth_name),
        partial(_read_depth, units_per_metre=1000.0, valid_m=(1e-3, 65.5)),
        "ai_XXX_YYY/rgb_cam_NN_frFFFF.png + ai_XXX_YYY/depth_plane_cam_NN_frFFFF.png (uint16 mm)",
    ),
    "vkitti_depth": Source(
        "depth",
        _scan_vkitti,
        partial(_read_depth, units_per_metre=100.0, valid_m=(0.1, 80.0), crop=True),
        "rgb/SceneXX/<var>/frames/rgb/Camera_k/rgb_NNNNN.jpg + depth/SceneXX/<var>/frames/depth/Camera_k/"
        "depth_NNNNN.png (uint16 cm)",
        crop=True,
    ),
    "hypersim_normal": Source(
        "normal",
        partial(_scan_beside, image_glob="rgb_cam_*.png", target_name=_hypersim_normal_name),
        read_normals_npy,
        "[train/]ai_XXX_YYY/rgb_cam_NN_frFFFF.png + ai_XXX_YYY/normal_cam_cam_NN_frFFFF.npy",
    ),
    "interiorverse_normal": Source(
        "normal",
        partial(_scan_beside, image_glob="*_img.png", target_name=_img_normal_name),
        read_normals_npy,
        "<scene>/<id>_img.png + <scene>/<id>_normal.npy",
    ),
    "sintel_normal": Source(
        "normal",
        partial(_scan_beside, image_glob="*_img.png", target_name=_img_normal_name),
        read_normals_npy,
        "<scene>/frame_NNNN_img.png + <scene>/frame_NNNN_normal.npy",
    ),
    "comp1k": Source("matting", partial(_scan_merged, folder="Training_set"), read_alpha,
                     "Training_set/merged/<name>_<k>.png + Training_set/alpha/<name>.jpg"),
    "distinctions646": Source("matting", partial(_scan_merged, folder="Train_comp"), read_alpha,
                              "Train_comp/merged/<name>.png_<k>.png + Train_comp/alpha/<name>.png"),
    "am2k": Source("matting", _scan_am2k, read_alpha, "train/original/m_<id>.jpg + train/mask/m_<id>.png"),
    "coco_matte": Source("matting", _scan_coco, read_alpha,
                         "COCO_Path/train2017/<id>.jpg + alpha/<id>_<class>_<nn>.png"),
}
