"""Procedural scenes with exact depth, surface normals and alpha, for the training tests.

A pinhole camera (OpenGL camera frame: +x right, +y up, looking along −z) sees a back wall, a floor, a box standing on
the floor and a sphere floating in front: the foreground object. Everything is ray-traced analytically, so

* ``depth_m``: planar depth (the camera-space −z of the first hit) at each pixel centre, exactly;
* ``normals_opengl``: the unit surface normal of that hit, in the OpenGL camera frame (the frame of the Hypersim
  ``.npy`` files; the training target is its x-negation, the E2P frame);
* ``alpha``: the fraction of a pixel's ``SUPERSAMPLING``² sub-rays whose first hit is the sphere (its coverage);
* ``image``: the shaded colour averaged over the same sub-rays, so the image is the exact coverage-weighted blend of
  sphere and background, consistent with depth and normals.

:func:`write_synthetic_folder` writes scenes in the plain ``folder`` dataset format of :mod:`train.data.folder`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SUPERSAMPLING = 4  # sub-rays per pixel side for image and alpha
FOCAL_PER_WIDTH = 0.9  # focal length in pixels / image width (about 58° horizontal field of view)
FLOOR_Y = -1.0  # the floor plane y = FLOOR_Y (metres, camera frame)
TASK_FOLDERS = {"depth": "depth", "normal": "normals", "matting": "alpha"}


def pixel_rays(size_hw: tuple[int, int], samples: int) -> np.ndarray:
    """Ray directions [h·s, w·s, 3] with z = −1, so the ray parameter of a hit is its planar depth."""
    height, width = size_hw
    focal = FOCAL_PER_WIDTH * width
    rows = (np.arange(height * samples) + 0.5) / samples  # sub-pixel centres in pixel units
    cols = (np.arange(width * samples) + 0.5) / samples
    x = (cols[None, :] - width / 2) / focal
    y = -(rows[:, None] - height / 2) / focal  # image rows go down, camera +y goes up
    x, y = np.broadcast_arrays(x, y)
    return np.stack([x, y, -np.ones_like(x)], axis=-1)


def _hit_plane(rays: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """Ray parameter t of the plane ``n·p = offset`` (inf where missed or behind the camera)."""
    denominator = rays @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = offset / denominator
    return np.where(np.isfinite(t) & (t > 0), t, np.inf)


def _hit_sphere(rays: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Nearest positive t of ``|t·d − c| = r`` (inf where missed)."""
    a = (rays * rays).sum(-1)
    b = -2 * (rays @ centre)
    c = centre @ centre - radius**2
    discriminant = b * b - 4 * a * c
    root = np.sqrt(np.clip(discriminant, 0, None))
    t = (-b - root) / (2 * a)
    return np.where((discriminant >= 0) & (t > 0), t, np.inf)


def _hit_box(rays: np.ndarray, centre: np.ndarray, half: np.ndarray, yaw: float) -> tuple[np.ndarray, np.ndarray]:
    """Slab test of a box rotated by ``yaw`` about +y → (t, outward normal [.., 3] in the camera frame)."""
    rotation = _yaw_rotation(yaw)
    local_dirs = rays @ rotation  # rotation.T applied to each direction: camera → box frame
    local_origin = -centre @ rotation
    with np.errstate(divide="ignore", invalid="ignore"):
        t_low = (-half - local_origin) / local_dirs
        t_high = (half - local_origin) / local_dirs
    t_enter_axes = np.minimum(t_low, t_high)
    t_exit = np.maximum(t_low, t_high).min(-1)
    axis = t_enter_axes.argmax(-1)
    t_enter = t_enter_axes.max(-1)
    hit = (t_enter <= t_exit) & (t_enter > 0)
    local_normal = np.zeros(rays.shape)
    np.put_along_axis(local_normal, axis[..., None], -np.sign(np.take_along_axis(local_dirs, axis[..., None], -1)), -1)
    return np.where(hit, t_enter, np.inf), local_normal @ rotation.T


def _trace(rays: np.ndarray, scene: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First hits → (depth, normal [.., 3], object id, hit point [.., 3]); ids: 0 wall, 1 floor, 2 box, 3 sphere."""
    (wall_normal, wall_offset), (floor_normal, floor_offset) = _planes(scene)
    t_wall = _hit_plane(rays, wall_normal, wall_offset)
    t_floor = _hit_plane(rays, floor_normal, floor_offset)
    t_box, box_normal = _hit_box(rays, scene["box_centre"], scene["box_half"], scene["box_yaw"])
    t_sphere = _hit_sphere(rays, scene["sphere_centre"], scene["sphere_radius"])
    hits = np.stack([t_wall, t_floor, t_box, t_sphere], axis=-1)
    object_id = hits.argmin(-1)
    depth = hits.min(-1)
    points = rays * depth[..., None]
    normals = {
        0: np.broadcast_to(wall_normal, rays.shape),
        1: np.broadcast_to(floor_normal, rays.shape),
        2: box_normal,
        3: (points - scene["sphere_centre"]) / scene["sphere_radius"],
    }
    normal = np.zeros(rays.shape)
    for index, value in normals.items():
        normal = np.where((object_id == index)[..., None], value, normal)
    return depth, normal, object_id, points


def _planes(scene: dict) -> tuple[tuple[np.ndarray, float], tuple[np.ndarray, float]]:
    """(normal, offset) of the wall and the floor planes ``n·p = offset`` in the camera frame."""
    if "planes" in scene:  # a view from a moved camera (``view_from``)
        return scene["planes"]
    return (np.array([0.0, 0.0, 1.0]), -scene["wall_distance"]), (np.array([0.0, 1.0, 0.0]), FLOOR_Y)


def _shade(normal: np.ndarray, object_id: np.ndarray, points: np.ndarray, scene: dict) -> np.ndarray:
    """Lambert shading of per-object albedos, with a checkerboard on wall and floor so the image has texture."""
    if "world_from_camera" in scene:  # the texture sticks to the world, not to a moving camera
        rotation, position = scene["world_from_camera"]
        points = points @ rotation.T + position
    albedo = scene["albedos"][object_id]
    checker = (np.floor(points[..., 0] * 2) + np.floor(points[..., 1] * 2) + np.floor(points[..., 2] * 2)) % 2
    albedo = np.where((object_id <= 1)[..., None], albedo * (0.7 + 0.3 * checker[..., None]), albedo)
    lambert = np.clip(normal @ scene["light"], 0, None)
    return np.clip(albedo * (0.25 + 0.75 * lambert[..., None]), 0, 1)


def _random_scene(rng: np.random.Generator) -> dict:
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.3, 0.9), 1.0])
    return {
        "wall_distance": rng.uniform(6.0, 9.0),
        "box_centre": np.array([rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 1.8), FLOOR_Y + 0.5,
                                -rng.uniform(4.0, 5.5)]),
        "box_half": np.array([rng.uniform(0.3, 0.6), 0.5, rng.uniform(0.3, 0.6)]),
        "box_yaw": rng.uniform(0, np.pi / 2),
        "sphere_centre": np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.2, 0.3), -rng.uniform(2.5, 3.5)]),
        "sphere_radius": rng.uniform(0.5, 0.8),
        "albedos": rng.uniform(0.2, 1.0, size=(4, 3)),
        "light": light / np.linalg.norm(light),
    }


def synthetic_scene(size_hw: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """One random scene at ``size_hw`` = (height, width) →

    ``image`` uint8 [H,W,3], ``depth_m`` float32 [H,W] (planar depth in metres, all valid), ``normals_opengl`` float32
    [H,W,3] (unit, OpenGL camera frame, facing the camera), ``alpha`` float32 [H,W] in [0,1] (sphere coverage).
    """
    return _render(_random_scene(np.random.default_rng(seed)), size_hw)


def _yaw_rotation(yaw: float) -> np.ndarray:
    """Rotation about +y (the box's own yaw convention)."""
    return np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])


def view_from(scene: dict, position: np.ndarray, yaw: float) -> dict:
    """The scene seen by a camera at ``position`` (metres, in the frame of the origin camera) turned by ``yaw``
    about +y: every object expressed in the moved camera's (OpenGL) frame."""
    rotation = _yaw_rotation(yaw)  # world_from_camera
    (wall_normal, wall_offset), (floor_normal, floor_offset) = _planes(scene)
    # n·(R p + c) = offset  <=>  (Rᵀ n)·p = offset − n·c
    planes = tuple((rotation.T @ n, offset - n @ position)
                   for n, offset in ((wall_normal, wall_offset), (floor_normal, floor_offset)))
    return {**scene, "planes": planes, "world_from_camera": (rotation, position),
            "box_centre": rotation.T @ (scene["box_centre"] - position), "box_yaw": scene["box_yaw"] - yaw,
            "sphere_centre": rotation.T @ (scene["sphere_centre"] - position), "light": rotation.T @ scene["light"]}


def camera_path(n_frames: int, amplitude_m: float = 0.35, yaw_amplitude: float = 0.12) -> list[tuple[np.ndarray, float]]:
    """A smooth hand-held-like path of ``n_frames`` (position, yaw): a sideways sway, a slow push in and out and a
    gentle pan, with incommensurate periods so no two stretches of the clip look alike."""
    t = np.arange(n_frames, dtype=np.float64)
    x = amplitude_m * np.sin(2 * np.pi * t / 97)
    y = 0.1 * amplitude_m * np.sin(2 * np.pi * t / 61)
    z = -0.8 * amplitude_m * (1 - np.cos(2 * np.pi * t / 151)) / 2  # moves toward the wall and back
    yaw = yaw_amplitude * np.sin(2 * np.pi * t / 73)
    return [(np.array([x[i], y[i], z[i]]), float(yaw[i])) for i in range(n_frames)]


def synthetic_video(size_hw: tuple[int, int], n_frames: int, seed: int, with_images: bool = False) -> dict:
    """Scene ``seed`` filmed along :func:`camera_path` →

    ``depth_m`` float32 [T,H,W] (exact planar depth), ``intrinsics`` float64 [3,3] (OpenCV: pixel (col, row) of the
    camera point (X, Y, Z) with +y down and +z forward is (fx X/Z + cx, fy Y/Z + cy), pixel centres at integers),
    ``world_from_camera`` float64 [T,4,4] (OpenCV camera frame), and with ``with_images`` ``image`` uint8 [T,H,W,3].
    """
    scene = _random_scene(np.random.default_rng(seed))
    height, width = size_hw
    focal = FOCAL_PER_WIDTH * width
    intrinsics = np.array([[focal, 0, width / 2 - 0.5], [0, focal, height / 2 - 0.5], [0, 0, 1]])
    opengl_to_opencv = np.diag([1.0, -1.0, -1.0])
    depths, poses, images = [], [], []
    for position, yaw in camera_path(n_frames):
        view = view_from(scene, position, yaw)
        if with_images:
            rendered = _render(view, size_hw)
            depths.append(rendered["depth_m"])
            images.append(rendered["image"])
        else:
            depths.append(_trace(pixel_rays(size_hw, 1), view)[0].astype(np.float32))
        pose = np.eye(4)
        pose[:3, :3] = _yaw_rotation(yaw) @ opengl_to_opencv
        pose[:3, 3] = position
        poses.append(pose)
    video = {"depth_m": np.stack(depths), "intrinsics": intrinsics, "world_from_camera": np.stack(poses)}
    if with_images:
        video["image"] = np.stack(images)
    return video


def _render(scene: dict, size_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    height, width = size_hw
    depth, normal, _, _ = _trace(pixel_rays(size_hw, 1), scene)
    sub_rays = pixel_rays(size_hw, SUPERSAMPLING)
    _, sub_normal, sub_id, sub_points = _trace(sub_rays, scene)
    colour = _shade(sub_normal, sub_id, sub_points, scene)
    blocks = (height, SUPERSAMPLING, width, SUPERSAMPLING)
    image = colour.reshape(*blocks, 3).mean(axis=(1, 3))
    alpha = (sub_id == 3).reshape(blocks).mean(axis=(1, 3))
    return {
        "image": np.round(image * 255).astype(np.uint8),
        "depth_m": depth.astype(np.float32),
        "normals_opengl": normal.astype(np.float32),
        "alpha": alpha.astype(np.float32),
    }


def write_synthetic_folder(
    root: str | Path, task: str, n: int, size_hw: tuple[int, int], seed: int = 0
) -> list[str]:
    """Write ``n`` scenes as a ``folder`` dataset under ``root`` → the sample names.

    ``images/<name>.png`` plus, for ``task`` (``depth``, ``normal``, ``matting`` or ``all``): ``depth/<name>.npy``
    (float32 metres), ``normals/<name>.npy`` (float32 [H,W,3], OpenGL camera frame), ``alpha/<name>.png`` (8-bit).
    Scene ``i`` uses seed ``seed + i``.
    """
    if task not in (*TASK_FOLDERS, "all"):
        raise ValueError(f"task must be one of {(*TASK_FOLDERS, 'all')}, got {task!r}")
    root = Path(root)
    tasks = list(TASK_FOLDERS) if task == "all" else [task]
    for folder in ["images"] + [TASK_FOLDERS[t] for t in tasks]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"scene_{i:04d}"
        arrays = synthetic_scene(size_hw, seed + i)
        Image.fromarray(arrays["image"]).save(root / "images" / f"{name}.png")
        if "depth" in tasks:
            np.save(root / "depth" / f"{name}.npy", arrays["depth_m"])
        if "normal" in tasks:
            np.save(root / "normals" / f"{name}.npy", arrays["normals_opengl"])
        if "matting" in tasks:
            Image.fromarray(np.round(arrays["alpha"] * 255).astype(np.uint8)).save(root / "alpha" / f"{name}.png")
        names.append(name)
    return names
