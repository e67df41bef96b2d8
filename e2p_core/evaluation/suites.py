"""Readers of the standard zero-shot benchmark suites, in the layouts they are distributed in.

Depth uses the sets as packaged for Marigold's evaluation (a folder, or the tar archive itself, plus Marigold's
filename list; without a list the samples are discovered from the file names). Crops and valid ranges are those of
the E2P evaluation (E2P-SPEC §6.1):

* ``nyuv2``: ``test/<scene>/rgb_NNNN.png`` + ``depth_NNNN.png`` (uint16 mm); 1e-3 < d < 10 m inside the Eigen crop.
* ``kitti``: ``<date>/<drive>/image_02/data/N.png`` + ``<drive>/proj_depth/groundtruth/image_02/N.png`` (uint16,
  /256); 1e-3 < d < 80 m inside the KB crop and the Eigen (Garg) crop.
* ``eth3d``: ``rgb/<scene>/images/dslr_images/X.JPG`` +
  ``depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/X.JPG`` (raw float32); 1e-3 < d < 99999 m.
* ``scannet``: ``<scene>/color/N.jpg`` + ``<scene>/depth/N.png`` (uint16 mm); 1e-3 < d < 10 m.
* ``diode``: ``…/X.png`` + ``X_depth.npy`` (metres) + ``X_depth_mask.npy``; 1e-3 < d < 80 m inside the mask.

The ranges above are the E2P protocol's; ``protocols.FE2E`` has Marigold's. KITTI images are cut to the 1216×352
benchmark (KB) crop before inference; E2P pastes the prediction back into the full ground-truth frame, FE2E scores the
crop. ETH3D depth files are raw little-endian float32 rasters of the image's size (inf = no depth).

Normals (nyuv2, scannet, ibims, diode): Marigold's sets, ``X_img.png`` (DIODE: ``X.png``) with ``X_normal.npy``
(unit normals ``[H,W,3]``, x negated on reading to get the E2P frame, §6.2; valid = norm > 1e-3), or DSINE's, as FE2E
evaluates them, ``X_img.png`` with ``X_normal.png`` (8-bit ``(n+1)/2``, used as stored, the frame FE2E compares in;
valid = any channel non-zero). DSINE's ``.exr`` normals (its iBims-1 and Sintel) are not read. Sintel is not a
benchmark here: it is in Edit2Perceive's normal training list.

Matting uses the validation sets with ``original_image/`` (P3M-500-NP) or ``original/`` (AM-2k, AIM-500) next to
``mask/`` (alpha), paired by file stem; E2P's 3-column lists ``image trimap alpha`` work too. AM-2k's archive also
holds ``train/`` (the training images): only ``validation/`` is discovered, and the result says so.

A filename list has whitespace-separated columns of paths relative to the root (Marigold's lists; a KITTI row whose
depth is ``None`` has no ground truth and is skipped).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..images import load_image_rgb
from ..targets import encode_normal_target
from .protocols import E2P, Protocol

NYU_EIGEN_CROP = (45, 471, 41, 601)  # rows top:bottom, cols left:right of the 480×640 frame
KITTI_BENCHMARK_HW = (352, 1216)  # the KB crop: bottom rows, centred columns
KITTI_EIGEN_CROP = (0.3324324, 0.91351351, 0.0359477, 0.96405229)  # fractions of the full frame (Garg/Eigen crop)


@dataclass(frozen=True)
class Sample:
    """One benchmark sample. ``target`` and ``valid`` are on the ground-truth grid [H,W]."""

    name: str  # path of the input image relative to the root
    image: np.ndarray  # uint8 [h,w,3]: what the model sees
    target: np.ndarray  # float32: depth_m [H,W] | normals_e2p [3,H,W] | alpha [H,W] in [0,1]
    valid: np.ndarray  # bool [H,W]
    region: tuple[int, int, int, int] | None = None  # (top, left, height, width) the image covers; None: all


class DataRoot:
    """A dataset folder or tar archive, read by relative POSIX paths (tar members are never extracted to disk)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tar = None
        if self.path.is_dir():
            return
        if not (self.path.is_file() and tarfile.is_tarfile(self.path)):
            raise InputError(f"data root {self.path} is neither a folder nor a tar archive")
        self._tar = tarfile.open(self.path)  # noqa: SIM115 -- held open for random access, closed by close()
        self._members = {_relative(member.name): member for member in self._tar.getmembers() if member.isfile()}

    @property
    def is_archive(self) -> bool:
        return self._tar is not None

    def names(self) -> list[str]:
        if self._tar is not None:
            return sorted(self._members)
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def exists(self, name: str) -> bool:
        return _relative(name) in self._members if self._tar is not None else (self.path / name).is_file()

    def read(self, name: str) -> bytes:
        if not self.exists(name):
            raise InputError(f"{name} is missing from {self.path}")
        if self._tar is not None:
            return self._tar.extractfile(self._members[_relative(name)]).read()
        return (self.path / name).read_bytes()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def __enter__(self) -> DataRoot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _relative(name: str) -> str:
    return PurePosixPath(name.removeprefix("./")).as_posix()


# ---------------------------------------------------------------------------------------------------------- files


def _rgb(root: DataRoot, name: str) -> np.ndarray:
    # No EXIF rotation: the ground truth is aligned with the stored pixel order, as the reference reads it.
    if not root.is_archive:
        return load_image_rgb(root.path / name, apply_exif_orientation=False)
    try:
        return load_image_rgb(io.BytesIO(root.read(name)), apply_exif_orientation=False)
    except InputError as error:
        raise InputError(f"{root.path}: member {name}: {error}") from None


def _raster(root: DataRoot, name: str) -> np.ndarray:
    """A PNG/JPEG as stored (uint16 stays uint16), [H,W] or [H,W,C]."""
    try:
        with Image.open(io.BytesIO(root.read(name))) as img:
            return np.array(img)
    except OSError as error:
        raise InputError(f"cannot read {root.path}/{name} as an image: {error}") from None


def _npy(root: DataRoot, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(root.read(name)), allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        raise InputError(f"cannot read {root.path}/{name} as a .npy array: {error}") from None


def _depth_png(root: DataRoot, name: str, units_per_metre: float) -> np.ndarray:
    raw = _raster(root, name)
    if raw.ndim != 2 or raw.dtype != np.uint16:
        raise InputError(f"{root.path}/{name} is not a 16-bit single-channel depth PNG ({raw.dtype}, {raw.shape})")
    return raw.astype(np.float32) / units_per_metre


def _check_same_size(image: np.ndarray, target_hw: tuple[int, ...], name: str) -> None:
    if image.shape[:2] != tuple(target_hw):
        raise InputError(f"{name}: the image is {image.shape[1]}x{image.shape[0]} but its ground truth is "
                         f"{target_hw[1]}x{target_hw[0]} (width x height)")


# ---------------------------------------------------------------------------------------------------------- depth


def _nyuv2_depth(root: DataRoot, row: list[str], protocol: Protocol) -> Sample:
    image, depth_m = _rgb(root, row[0]), _depth_png(root, row[1], 1000.0)
    _check_same_size(image, depth_m.shape, row[0])
    crop = np.zeros(depth_m.shape, dtype=bool)
    top, bottom, left, right = NYU_EIGEN_CROP
    crop[top:bottom, left:right] = True
    return Sample(row[0], image, depth_m, crop)


def _eigen_mask(height: int, width: int) -> np.ndarray:
    eigen = np.zeros((height, width), dtype=bool)
    r0, r1, c0, c1 = KITTI_EIGEN_CROP
    eigen[int(r0 * height):int(r1 * height), int(c0 * width):int(c1 * width)] = True
    return eigen


def _kitti_depth(root: DataRoot, row: list[str], protocol: Protocol) -> Sample:
    full_image, depth_m = _rgb(root, row[0]), _depth_png(root, row[1], 256.0)
    _check_same_size(full_image, depth_m.shape, row[0])
    height, width = depth_m.shape
    crop_h, crop_w = KITTI_BENCHMARK_HW
    if height < crop_h or width < crop_w:
        raise InputError(f"{row[0]} is {width}x{height}; KITTI frames hold the {crop_w}x{crop_h} benchmark crop")
    top, left = height - crop_h, (width - crop_w) // 2
    image = full_image[top:top + crop_h, left:left + crop_w]
    if protocol.kitti_eigen_on_crop:  # Marigold/FE2E: everything on the crop, the Eigen fractions of the crop
        cropped = depth_m[top:top + crop_h, left:left + crop_w]
        return Sample(row[0], image, cropped, _eigen_mask(crop_h, crop_w))
    region = np.zeros(depth_m.shape, dtype=bool)
    region[top:top + crop_h, left:left + crop_w] = True
    return Sample(row[0], image, depth_m, region & _eigen_mask(height, width), (top, left, crop_h, crop_w))


def _eth3d_depth(root: DataRoot, row: list[str], protocol: Protocol) -> Sample:
    image = _rgb(root, row[0])
    raw = root.read(row[1])
    height, width = image.shape[:2]
    if len(raw) != 4 * height * width:
        raise InputError(f"{root.path}/{row[1]} has {len(raw)} bytes; a raw float32 depth map of the "
                         f"{width}x{height} image has {4 * height * width}")
    depth_m = np.frombuffer(raw, dtype="<f4").reshape(height, width).astype(np.float32)  # little-endian, copied
    depth_m[np.isinf(depth_m)] = 0.0
    return Sample(row[0], image, depth_m, np.ones(depth_m.shape, dtype=bool))


def _scannet_depth(root: DataRoot, row: list[str], protocol: Protocol) -> Sample:
    image, depth_m = _rgb(root, row[0]), _depth_png(root, row[1], 1000.0)
    _check_same_size(image, depth_m.shape, row[0])
    return Sample(row[0], image, depth_m, np.ones(depth_m.shape, dtype=bool))


def _diode_depth(root: DataRoot, row: list[str], protocol: Protocol) -> Sample:
    image = _rgb(root, row[0])
    depth_m = _npy(root, row[1]).astype(np.float32).squeeze()
    mask = _npy(root, row[2]).squeeze() > 0
    _check_same_size(image, depth_m.shape, row[0])
    return Sample(row[0], image, depth_m, mask)


# --------------------------------------------------------------------------------------------- depth: discovery


def _matching(names: list[str], pattern: str) -> Iterator[re.Match]:
    compiled = re.compile(pattern)
    return (match for match in map(compiled.fullmatch, names) if match)


def _discover_nyuv2(names: list[str]) -> list[list[str]]:
    present = set(names)
    rows = [[m[0], f"{m[1]}depth_{m[2]}.png"] for m in _matching(names, r"(.*/|)rgb_(\d+)\.png")]
    rows = [row for row in rows if row[1] in present]
    test_rows = [row for row in rows if row[0].startswith("test/")]  # the labeled archive also holds train/
    return test_rows or rows


def _discover_kitti(names: list[str]) -> list[list[str]]:
    rows = []
    ground_truth = r"(?:(.*)/)?((\d{4}_\d\d_\d\d)_drive_\d+_sync)/proj_depth/groundtruth/(image_0[23])/(\d+)\.png"
    for m in _matching(names, ground_truth):
        prefix = f"{m[1]}/" if m[1] else ""
        rows.append([f"{prefix}{m[3]}/{m[2]}/{m[4]}/data/{m[5]}.png", m[0]])
    present = set(names)
    return [row for row in rows if row[0] in present]


def _discover_eth3d(names: list[str]) -> list[list[str]]:
    # The ETH3D high-res multi-view archives as Marigold packs them: <scene>_dslr_jpg.7z unpacked under rgb/,
    # <scene>_dslr_depth.7z under depth/ (the depth "JPG" is a raw float32 raster named after its image).
    present = set(names)
    rows = [[m[0], f"{m[1]}depth/{m[2]}_dslr_depth/{m[2]}/ground_truth_depth/dslr_images/{m[3]}"]
            for m in _matching(names, r"(.*/|)rgb/([^/]+)/images/dslr_images/([^/]+\.JPG)")]
    return [row for row in rows if row[1] in present]


def _discover_scannet(names: list[str]) -> list[list[str]]:
    present = set(names)
    rows = [[m[0], f"{m[1]}/depth/{m[2]}.png"] for m in _matching(names, r"(.*)/color/(\d+)\.jpg")]
    return [row for row in rows if row[1] in present]


def _discover_diode(names: list[str]) -> list[list[str]]:
    present = set(names)
    rows = [[m[0], f"{m[1]}_depth.npy", f"{m[1]}_depth_mask.npy"] for m in _matching(names, r"(.*)\.png")]
    return [row for row in rows if row[1] in present and row[2] in present]


# -------------------------------------------------------------------------------------------- normals, matting


def _normal_sample(root: DataRoot, row: list[str], protocol: Protocol) -> Sample:
    image = _rgb(root, row[0])
    normal_file = row[1] if len(row) > 1 else _normal_file_of(root, row[0])
    if normal_file.endswith(".png"):
        normals, valid = _dsine_normal_png(root, normal_file)
    else:
        normals, valid = _marigold_normal_npy(root, normal_file)
    _check_same_size(image, valid.shape, row[0])
    return Sample(row[0], image, normals, valid)


def _normal_file_of(root: DataRoot, image_name: str) -> str:
    """The ground truth of a one-column list row (DSINE's splits): ``X_normal.png`` if present, as FE2E prefers it,
    else ``X_normal.npy``."""
    stem = re.sub(r"(_img)?\.(png|jpg)$", "", image_name)
    return f"{stem}_normal.png" if root.exists(f"{stem}_normal.png") else f"{stem}_normal.npy"


def _marigold_normal_npy(root: DataRoot, name: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _npy(root, name).astype(np.float32)
    if raw.ndim != 3 or 3 not in (raw.shape[0], raw.shape[-1]):
        raise InputError(f"{root.path}/{name} has shape {raw.shape}; expected normals [H,W,3] or [3,H,W]")
    normals = raw if raw.shape[0] == 3 and raw.shape[-1] != 3 else raw.transpose(2, 0, 1)  # [3,H,W]
    normals = normals * np.array([-1, 1, 1], dtype=np.float32)[:, None, None]  # Marigold frame -> E2P frame (§6.2)
    unit, valid = encode_normal_target(torch.from_numpy(np.ascontiguousarray(normals)))
    return unit.numpy(), valid.numpy()


def _dsine_normal_png(root: DataRoot, name: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _raster(root, name)
    if raw.ndim != 3 or raw.shape[2] != 3 or raw.dtype != np.uint8:
        raise InputError(f"{root.path}/{name} is not an 8-bit RGB normal map ({raw.dtype}, {raw.shape})")
    valid = raw.astype(np.int32).sum(axis=2) > 0  # DSINE: black = no ground truth
    normals = raw.transpose(2, 0, 1).astype(np.float32) / 255.0 * 2.0 - 1.0  # [3,H,W], used as stored
    return normals, valid


def _discover_normals(names: list[str]) -> list[list[str]]:
    """``X_img.png`` (Marigold, DSINE) or ``X.png`` (Marigold's DIODE) with ``X_normal.png`` (DSINE) or
    ``X_normal.npy`` (Marigold); the PNG wins when both exist, as in FE2E's readers."""
    present, rows = set(names), []
    for m in _matching(names, r"(.*)_normal\.(png|npy)"):
        if m[2] == "npy" and f"{m[1]}_normal.png" in present:
            continue
        image = next((f"{m[1]}{suffix}" for suffix in ("_img.png", "_img.jpg", ".png", ".jpg")
                      if f"{m[1]}{suffix}" in present), None)
        if image is not None:
            rows.append([image, m[0]])
    return sorted(rows)


def _matting_sample(root: DataRoot, row: list[str], protocol: Protocol) -> Sample:
    image = _rgb(root, row[0])
    raw = _raster(root, row[-1])  # E2P lists: image trimap alpha; 2-column lists: image alpha
    raw = raw[..., 0] if raw.ndim == 3 else raw
    alpha = raw.astype(np.float32) / (65535.0 if raw.dtype == np.uint16 else 255.0)
    _check_same_size(image, alpha.shape, row[0])
    return Sample(row[0], image, alpha, np.ones(alpha.shape, dtype=bool))


def _discover_matting(names: list[str]) -> list[list[str]]:
    masks = {(m[1], PurePosixPath(m[2]).stem): m[0] for m in _matching(names, r"(.*/|)mask/([^/]+)")}
    rows = []
    for m in _matching(names, r"(.*/|)(?:original_image|original)/([^/]+\.(?:jpg|jpeg|png))"):
        mask = masks.get((m[1], PurePosixPath(m[2]).stem))
        if mask:
            rows.append([m[0], mask])
    return rows


def _without_training_images(rows: list[list[str]]) -> tuple[list[list[str]], str | None]:
    """AM-2k: the benchmark is ``validation/`` (200 images); a ``train/`` folder next to it is training data."""
    training = [row for row in rows if "train" in PurePosixPath(row[0]).parts]
    if not training:
        return rows, None
    kept = [row for row in rows if "train" not in PurePosixPath(row[0]).parts]
    if not kept:
        raise InputError("found only train/ images; AM-2k is evaluated on its validation/ folder (give the AM-2k root "
                         "or its validation/ folder)")
    return kept, f"validation/ only: {len(kept)} images; {len(training)} others (train/) were left out"


# ----------------------------------------------------------------------------------------------------- the suites


@dataclass(frozen=True)
class Suite:
    """A benchmark: how to find its samples in a root and how to read one."""

    task: str
    name: str  # the CLI name
    title: str  # the report's column title
    discover: Callable[[list[str]], list[list[str]]]  # all file names of the root -> rows of relative paths
    read: Callable[[DataRoot, list[str], Protocol], Sample]  # one row -> a sample (depth: valid before the range)
    min_columns: int  # what a filename-list row must hold
    narrow: Callable[[list[list[str]]], tuple[list[list[str]], str | None]] | None = None  # discovered rows -> the
    # benchmark's share of them and a note for the report

    def load(self, root: DataRoot, row: list[str], protocol: Protocol = E2P) -> Sample:
        """The sample of one row; depth samples are valid only inside the protocol's depth range for the suite."""
        sample = self.read(root, row, protocol)
        if self.task != "depth":
            return sample
        depth_range = protocol.depth_range(self.name)
        if not depth_range.masks_ground_truth:
            return sample
        return replace(sample, valid=sample.valid & depth_range.valid(sample.target))

    def find(self, root: DataRoot, list_file: str | Path | None = None) -> tuple[list[list[str]], str | None]:
        """The sample rows and a note on what discovery left out (None when nothing was)."""
        if list_file is not None:
            return self.rows(root, list_file), None
        rows = self.discover(root.names())
        if not rows:
            raise InputError(f"found no {self.title} samples in {root.path}; see e2p_core/evaluation/suites.py for "
                             f"the expected layout, or give the filename list")
        return self.narrow(rows) if self.narrow is not None else (rows, None)

    def rows(self, root: DataRoot, list_file: str | Path | None = None) -> list[list[str]]:
        """The sample rows: from ``list_file`` (columns of relative paths) or discovered in ``root``."""
        if list_file is None:
            return self.find(root)[0]
        path = Path(list_file)
        if not path.is_file():
            raise InputError(f"filename list {path} does not exist")
        rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        short = [row for row in rows if len(row) < self.min_columns]
        if short:
            raise InputError(f"{path}: {len(short)} row(s) have fewer than {self.min_columns} columns, e.g. {short[0]}")
        return [row for row in rows if "None" not in row[:self.min_columns]]  # KITTI frames without ground truth


SUITES: dict[tuple[str, str], Suite] = {
    (suite.task, suite.name): suite
    for suite in (
        Suite("depth", "nyuv2", "NYUv2", _discover_nyuv2, _nyuv2_depth, 2),
        Suite("depth", "kitti", "KITTI", _discover_kitti, _kitti_depth, 2),
        Suite("depth", "eth3d", "ETH3D", _discover_eth3d, _eth3d_depth, 2),
        Suite("depth", "scannet", "ScanNet", _discover_scannet, _scannet_depth, 2),
        Suite("depth", "diode", "DIODE", _discover_diode, _diode_depth, 3),
        Suite("normal", "nyuv2", "NYUv2", _discover_normals, _normal_sample, 1),
        Suite("normal", "scannet", "ScanNet", _discover_normals, _normal_sample, 1),
        Suite("normal", "ibims", "iBims-1", _discover_normals, _normal_sample, 1),
        Suite("normal", "diode", "DIODE", _discover_normals, _normal_sample, 1),
        Suite("matting", "p3m500np", "P3M-500-NP", _discover_matting, _matting_sample, 2),
        Suite("matting", "am2k", "AM-2k", _discover_matting, _matting_sample, 2, _without_training_images),
        Suite("matting", "aim500", "AIM-500", _discover_matting, _matting_sample, 2),
    )
}


def get_suite(task: str, name: str) -> Suite:
    try:
        return SUITES[(task, name)]
    except KeyError:
        known = sorted(suite for t, suite in SUITES if t == task)
        raise InputError(f"no {task} suite named {name!r}; the {task} suites are {known}") from None
