"""Training data readers: every dataset kind on tiny files written here in that dataset's real layout, the value
conversions (mm/cm → m, validity ranges, VKITTI crop, normal x-negation, alpha binarisation), the plain folder
format with the synthetic scenes, and skipping of corrupt samples."""

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from e2p_core.errors import InputError
from train.data import DatasetSpec, build_dataset
from train_support.synthetic import pixel_rays, synthetic_scene, write_synthetic_folder


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def expected_depth_target(depth_m: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The paper's eq. 12 with numpy: sqrt depth, p2/p98 of the valid pixels → [-1, 1], near = -1."""
    mapped = np.sqrt(depth_m.astype(np.float64) + 1e-6)
    low, high = np.percentile(mapped[valid], [2, 98])
    return np.clip(((mapped - low) / (high - low) - 0.5) * 2, -1, 1)


# --- depth -----------------------------------------------------------------------------------------------------------

HYPERSIM_MM = np.array([[0, 1, 2, 1500], [65499, 65500, 65535, 3000], [700, 800, 900, 1000]], dtype=np.uint16)


def test_hypersim_depth_millimetres_to_metres_and_validity(tmp_path):
    scene = tmp_path / "ai_001_002"
    image = rgb(3, 4)
    write_png(scene / "rgb_cam_00_fr0000.png", image)
    write_png(scene / "depth_plane_cam_00_fr0000.png", HYPERSIM_MM)
    write_png(scene / "rgb_cam_00_fr0001.png", image)  # no depth: left out of the scan
    dataset = build_dataset(DatasetSpec("hypersim_depth", tmp_path), "depth", (3, 4))
    assert len(dataset) == 1
    sample = dataset[0]
    expected_m = HYPERSIM_MM.astype(np.float64) / 1000
    np.testing.assert_allclose(sample["depth_m"].numpy(), expected_m, rtol=1e-6)
    expected_valid = (expected_m > 1e-3) & (expected_m < 65.5)  # 0, 1 mm, 65.5 m and 65.535 m are invalid
    assert sample["valid"].tolist() == expected_valid.tolist()
    assert sample["valid"].sum() == 8
    np.testing.assert_allclose(sample["target"][0].numpy()[expected_valid],
                               expected_depth_target(expected_m, expected_valid)[expected_valid], atol=1e-5)
    assert torch.equal(sample["target"][0], sample["target"][2])
    np.testing.assert_allclose(sample["image"].numpy(), image.transpose(2, 0, 1) / 255 * 2 - 1, atol=1e-6)
    assert (sample["task"], sample["source"]) == ("depth", "hypersim_depth")
    assert "point_map" not in sample and "trimap" not in sample


def test_depth_is_resized_before_the_validity_mask(tmp_path):
    depth_mm = np.full((16, 16), 2000, dtype=np.uint16)
    depth_mm[1, 1] = 0  # a hole: blended into its neighbours by the resize, so valid afterwards (as the reference)
    write_png(tmp_path / "s" / "rgb_cam_00_fr0000.png", rgb(16, 16))
    write_png(tmp_path / "s" / "depth_plane_cam_00_fr0000.png", depth_mm)
    sample = build_dataset(DatasetSpec("hypersim_depth", tmp_path), "depth", (4, 4))[0]
    assert sample["valid"].all()
    assert 1.0 < sample["depth_m"][0, 0] < 1.999  # the hole's block: pulled below 2 m, not invalid
    assert sample["depth_m"][3, 3] == pytest.approx(2.0, abs=1e-6)  # beyond the filter's reach: untouched


def vkitti_paths(root: Path, scene: str, frame: int) -> tuple[Path, Path]:
    rgb_path = root / "rgb" / scene / "clone" / "frames" / "rgb" / "Camera_0" / f"rgb_{frame:05d}.jpg"
    depth_path = root / "depth" / scene / "clone" / "frames" / "depth" / "Camera_0" / f"depth_{frame:05d}.png"
    return rgb_path, depth_path


def test_vkitti_centimetres_validity_and_bottom_centre_crop(tmp_path):
    height, width = 375, 1242  # a Virtual KITTI 2 frame
    top, left = height - 352, (width - 1216) // 2  # bottom-centre 1216x352: rows 23.., columns 13..1228
    depth_cm = np.full((height, width), 5000, dtype=np.uint16)
    depth_cm[:top] = 1  # rows the crop removes
    depth_cm[:, :left] = 1
    depth_cm[:, left + 1216:] = 1
    depth_cm[top, left:left + 6] = [10, 11, 7999, 8000, 65535, 123]  # 0.1 m and 80 m are outside (strict)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[top:, left:left + 1216] = (0, 0, 255)
    image[:top] = (255, 0, 0)  # red only outside the crop
    rgb_path, depth_path = vkitti_paths(tmp_path, "Scene01", 0)
    write_png(rgb_path.with_suffix(".png"), image).rename(rgb_path)  # PNG bytes under .jpg: lossless colours
    write_png(depth_path, depth_cm)
    sample = build_dataset(DatasetSpec("vkitti_depth", tmp_path), "depth", (352, 1216))[0]
    expected_m = depth_cm[top:, left:left + 1216].astype(np.float64) / 100
    np.testing.assert_allclose(sample["depth_m"].numpy(), expected_m, rtol=1e-6)
    assert sample["valid"][0, :6].tolist() == [False, True, True, False, False, True]
    assert sample["valid"].sum() == 352 * 1216 - 3
    assert torch.equal(sample["image"][:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))  # blue: no red row survived
    assert (sample["image"][0] == -1).all()


def test_vkitti_scan_pairs_rgb_with_depth_and_resizes_to_the_training_size(tmp_path):
    for frame in range(2):
        rgb_path, depth_path = vkitti_paths(tmp_path, "Scene02", frame)
        write_png(rgb_path.with_suffix(".png"), rgb(375, 1242, frame)).rename(rgb_path)
        write_png(depth_path, np.full((375, 1242), 1234, dtype=np.uint16))
    dataset = build_dataset(DatasetSpec("vkitti_depth", tmp_path), "depth", (32, 96))
    assert [p[1].name for p in dataset.pairs] == ["depth_00000.png", "depth_00001.png"]
    sample = dataset[1]
    assert sample["image"].shape == (3, 32, 96) and sample["depth_m"].shape == (32, 96)
    np.testing.assert_allclose(sample["depth_m"].numpy(), 12.34, rtol=1e-6)


@pytest.mark.parametrize("space", ["log", "uniform"])
def test_depth_spaces_are_options(tmp_path, space):
    depth_mm = np.arange(1, 65, dtype=np.uint16).reshape(8, 8) * 100
    write_png(tmp_path / "images" / "a.png", rgb(8, 8))
    write_png(tmp_path / "depth" / "a.png", depth_mm)
    sample = build_dataset(DatasetSpec("folder", tmp_path), "depth", (8, 8), depth_space=space)[0]
    depth_m = depth_mm.astype(np.float64) / 1000
    mapped = np.log(depth_m + 1e-6) if space == "log" else depth_m
    low, high = np.percentile(mapped, [2, 98])
    np.testing.assert_allclose(sample["target"][0].numpy(), np.clip(((mapped - low) / (high - low) - 0.5) * 2, -1, 1),
                               atol=1e-5)


# --- normals ---------------------------------------------------------------------------------------------------------

def normals_field(height: int, width: int) -> np.ndarray:
    """OpenGL-frame normals [H,W,3]: varied, not unit length, a zero vector and a NaN one (both invalid)."""
    rng = np.random.default_rng(3)
    normals = rng.normal(size=(height, width, 3))
    normals[..., 2] = np.abs(normals[..., 2]) + 0.1
    normals[0, 0] = 0
    normals[2, 3] = np.nan
    return normals * rng.uniform(0.5, 2.0, size=(height, width, 1))


def expected_normals_e2p(normals_opengl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flipped = normals_opengl * np.array([-1.0, 1.0, 1.0])
    norm = np.linalg.norm(flipped, axis=-1, keepdims=True)
    valid = norm[..., 0] > 1e-3
    unit = np.where(valid[..., None], flipped / np.maximum(norm, 1e-3), 0)
    return unit.transpose(2, 0, 1), valid


@pytest.mark.parametrize("kind, image_rel, normal_rel", [
    ("hypersim_normal", "train/ai_003_004/rgb_cam_01_fr0002.png", "train/ai_003_004/normal_cam_cam_01_fr0002.npy"),
    ("interiorverse_normal", "L3D124S8ENDIDQ4YGYUI5NYALUF3P3XC888/012_img.png",
     "L3D124S8ENDIDQ4YGYUI5NYALUF3P3XC888/012_normal.npy"),
    ("sintel_normal", "alley_2/frame_0001_img.png", "alley_2/frame_0001_normal.npy"),
])
def test_normal_readers_negate_x_and_normalise(tmp_path, kind, image_rel, normal_rel):
    normals = normals_field(5, 6)
    write_png(tmp_path / image_rel, rgb(5, 6))
    write_npy(tmp_path / normal_rel, normals)  # float64, as the preprocessing scripts save
    dataset = build_dataset(DatasetSpec(kind, tmp_path), "normal", (5, 6))
    assert [(str(a.relative_to(tmp_path)), str(b.relative_to(tmp_path))) for a, b in dataset.pairs] == [
        (image_rel, normal_rel)]
    sample = dataset[0]
    unit, valid = expected_normals_e2p(normals)
    assert sample["valid"].tolist() == valid.tolist() and not sample["valid"][0, 0] and not sample["valid"][2, 3]
    np.testing.assert_allclose(sample["target"].numpy(), unit, atol=1e-6)
    assert sample["target"][0, 1, 1] * normals[1, 1, 0] < 0  # the x axis really is flipped
    assert "depth_m" not in sample


def test_normals_are_resized_and_renormalised(tmp_path):
    normals = np.broadcast_to(np.array([0.6, 0.0, 0.8]) * 3, (10, 12, 3)).copy()
    write_png(tmp_path / "images" / "a.png", rgb(10, 12))
    write_npy(tmp_path / "normals" / "a.npy", normals.astype(np.float32))
    sample = build_dataset(DatasetSpec("folder", tmp_path), "normal", (4, 8))[0]
    assert sample["target"].shape == (3, 4, 8)
    np.testing.assert_allclose(sample["target"][:, 2, 3].numpy(), [-0.6, 0.0, 0.8], atol=1e-6)


# --- matting ---------------------------------------------------------------------------------------------------------

def alpha_disk(height: int, width: int) -> np.ndarray:
    """uint8 alpha: a disk of 255 with a soft ramp ring (values strictly between 0 and 255)."""
    rows, cols = np.mgrid[:height, :width]
    distance = np.hypot(rows - height / 2, cols - width / 2)
    return np.clip((height / 3 - distance) / 3 * 255, 0, 255).astype(np.uint8)


MATTING_LAYOUTS = {
    "comp1k": ("Training_set/merged/cat_3.png", "Training_set/alpha/cat.jpg"),
    "distinctions646": ("Train_comp/merged/1a2b3c.png_7.png", "Train_comp/alpha/1a2b3c.png"),
    "am2k": ("train/original/m_0a1b2c3d.jpg", "train/mask/m_0a1b2c3d.png"),
    "coco_matte": ("COCO_Path/train2017/000000000139.jpg", "alpha/000000000139_dining table_01.png"),
}


def write_matting_pair(root: Path, image_rel: str, alpha_rel: str, alpha: np.ndarray) -> None:
    for rel, array in ((image_rel, rgb(*alpha.shape)), (alpha_rel, alpha)):
        target = root / rel
        # Image content is decoded from the bytes, whatever the suffix: PNG keeps the test's values exact.
        write_png(target.with_suffix(".tmp.png"), array).rename(target)


@pytest.mark.parametrize("kind", sorted(MATTING_LAYOUTS))
def test_matting_readers_scan_their_layout_and_binarise_alpha(tmp_path, kind):
    image_rel, alpha_rel = MATTING_LAYOUTS[kind]
    alpha = alpha_disk(40, 48)
    write_matting_pair(tmp_path, image_rel, alpha_rel, alpha)
    dataset = build_dataset(DatasetSpec(kind, tmp_path), "matting", (40, 48))
    assert [(str(a.relative_to(tmp_path)), str(b.relative_to(tmp_path))) for a, b in dataset.pairs] == [
        (image_rel, alpha_rel)]
    sample = dataset[0]
    expected = np.where(alpha / 255 > 0.5, 1.0, -1.0)
    np.testing.assert_array_equal(sample["target"].numpy(), np.broadcast_to(expected, (3, 40, 48)))
    assert sample["valid"].all() and sample["trimap"].dtype == torch.uint8
    assert sample["point_map"].shape == (1, 40, 48)


def test_soft_alpha_option_and_coco_list_file_with_spaces(tmp_path):
    image_rel, alpha_rel = MATTING_LAYOUTS["coco_matte"]
    alpha = alpha_disk(24, 24)
    write_matting_pair(tmp_path, image_rel, alpha_rel, alpha)
    list_file = tmp_path / "coco_train.txt"
    list_file.write_text(f"{image_rel}\t{alpha_rel}\n\n")  # TAB-separated: the class name has a space
    dataset = build_dataset(DatasetSpec("coco_matte", tmp_path, list_file=list_file), "matting", (24, 24),
                            binarize_alpha=False)
    sample = dataset[0]
    np.testing.assert_allclose(sample["target"][1].numpy(), alpha / 255 * 2 - 1, atol=1e-6)
    assert sample["path"] == str(tmp_path / image_rel)


def test_a_corrupt_coco_alpha_does_not_skip_the_other_instances_of_its_image(tmp_path):
    image_rel, alpha_rel = MATTING_LAYOUTS["coco_matte"]
    write_matting_pair(tmp_path, image_rel, alpha_rel, alpha_disk(16, 16))
    (tmp_path / "alpha" / "000000000139_dining table_00.png").write_bytes(b"broken")  # sorts first
    dataset = build_dataset(DatasetSpec("coco_matte", tmp_path), "matting", (16, 16))
    assert len(dataset) == 2
    assert dataset[0]["skipped"] == 1 and dataset[1]["skipped"] == 0
    assert len(dataset.skipped) == 1


def test_list_files_whitespace_three_columns_and_errors(tmp_path):
    write_matting_pair(tmp_path, "validation/original/a.jpg", "validation/mask/a.png", alpha_disk(16, 16))
    three = tmp_path / "val.txt"
    three.write_text("validation/original/a.jpg validation/trimap/a.png validation/mask/a.png\n")
    dataset = build_dataset(DatasetSpec("am2k", tmp_path, list_file=three), "matting", (16, 16))
    assert dataset.pairs == [(tmp_path / "validation/original/a.jpg", tmp_path / "validation/mask/a.png")]
    with pytest.raises(InputError, match="line 1 has 3 column"):
        build_dataset(DatasetSpec("folder", tmp_path, list_file=three), "depth", (16, 16))
    with pytest.raises(InputError, match="does not exist"):
        build_dataset(DatasetSpec("am2k", tmp_path, list_file=tmp_path / "missing.txt"), "matting", (16, 16))


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="unknown dataset kind 'nyu'"):
        build_dataset(DatasetSpec("nyu", tmp_path), "depth", (8, 8))
    with pytest.raises(InputError, match="is a depth dataset, not normal"):
        build_dataset(DatasetSpec("hypersim_depth", tmp_path), "normal", (8, 8))
    with pytest.raises(InputError, match="is not a folder"):
        build_dataset(DatasetSpec("folder", tmp_path / "nowhere"), "depth", (8, 8))
    with pytest.raises(InputError, match=r"no \(image, target\) pair under .*images/<name>"):
        build_dataset(DatasetSpec("folder", tmp_path), "depth", (8, 8))


# --- the synthetic scenes and the folder format -----------------------------------------------------------------------

def test_synthetic_depth_normals_and_alpha_are_consistent():
    size_hw = (48, 64)
    scene = synthetic_scene(size_hw, seed=5)
    depth, normals, alpha = scene["depth_m"], scene["normals_opengl"].astype(np.float64), scene["alpha"]
    assert np.isfinite(depth).all() and (depth > 0).all()
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1, atol=1e-5)
    # Normals from the back-projected depth (central differences) agree with the given ones on smooth surfaces.
    points = pixel_rays(size_hw, 1) * depth[..., None].astype(np.float64)
    cross = np.cross(points[1:-1, 2:] - points[1:-1, :-2], points[2:, 1:-1] - points[:-2, 1:-1])
    cross /= np.linalg.norm(cross, axis=-1, keepdims=True)
    agreement = np.abs((cross * normals[1:-1, 1:-1]).sum(-1))
    assert np.mean(agreement > 0.999) > 0.8
    # Planar depth: the fronto-parallel back wall has one depth everywhere.
    wall = np.all(np.abs(normals - [0, 0, 1]) < 1e-6, axis=-1)
    assert wall.sum() > 100 and np.ptp(depth[wall]) < 1e-4
    # Normals face the camera (the camera sits at the origin, looking along -z).
    assert ((normals * points).sum(-1) < 1e-6).all()
    # Alpha: the sphere's coverage, 1 inside, 0 outside, fractional on its silhouette, and nearer than the wall.
    assert alpha.max() == 1 and alpha.min() == 0 and ((alpha > 0) & (alpha < 1)).sum() > 10
    assert depth[alpha == 1].max() < depth[wall].min()
    assert np.array_equal(synthetic_scene(size_hw, seed=5)["image"], scene["image"])
    assert not np.array_equal(synthetic_scene(size_hw, seed=6)["image"], scene["image"])


def test_folder_dataset_reads_the_synthetic_scenes_in_every_task(tmp_path):
    names = write_synthetic_folder(tmp_path, "all", 3, (40, 56), seed=11)
    scene = synthetic_scene((40, 56), seed=12)  # the second scene
    depth = build_dataset(DatasetSpec("folder", tmp_path), "depth", (40, 56))
    normal = build_dataset(DatasetSpec("folder", tmp_path), "normal", (40, 56))
    matting = build_dataset(DatasetSpec("folder", tmp_path), "matting", (40, 56))
    assert len(depth) == len(normal) == len(matting) == len(names) == 3
    np.testing.assert_allclose(depth[1]["depth_m"].numpy(), scene["depth_m"], rtol=1e-6)
    assert depth[1]["valid"].all()
    np.testing.assert_allclose(normal[1]["target"].numpy(), expected_normals_e2p(scene["normals_opengl"])[0],
                               atol=1e-6)
    alpha_8bit = np.round(scene["alpha"] * 255) / 255
    np.testing.assert_array_equal(matting[1]["target"][0].numpy(), np.where(alpha_8bit > 0.5, 1.0, -1.0))
    np.testing.assert_allclose(matting[1]["image"].numpy(), scene["image"].transpose(2, 0, 1) / 255 * 2 - 1,
                               atol=1e-6)
    batch = next(iter(DataLoader(depth, batch_size=3)))
    assert batch["target"].shape == (3, 3, 40, 56) and batch["task"] == ["depth"] * 3


def test_folder_depth_npy_metres_with_invalid_pixels(tmp_path):
    depth = np.full((6, 6), 3.0, dtype=np.float32)
    depth[0, 0], depth[0, 1], depth[0, 2], depth[0, 3] = np.nan, np.inf, 0.0, 1e-3
    write_png(tmp_path / "images" / "x.jpg", rgb(6, 6))
    write_npy(tmp_path / "depth" / "x.npy", depth)
    sample = build_dataset(DatasetSpec("folder", tmp_path), "depth", (6, 6))[0]
    assert sample["valid"][0, :5].tolist() == [False, False, False, False, True]
    assert sample["valid"].sum() == 32
    assert torch.isfinite(sample["depth_m"]).all()


# --- corrupt samples -------------------------------------------------------------------------------------------------

def test_corrupt_samples_are_skipped_reported_and_counted(tmp_path, caplog):
    write_synthetic_folder(tmp_path, "depth", 5, (24, 32), seed=0)
    truncated = tmp_path / "images" / "scene_0001.png"
    truncated.write_bytes(truncated.read_bytes()[:-200])  # the decoder runs out of data
    (tmp_path / "depth" / "scene_0003.npy").unlink()
    list_file = tmp_path / "train.txt"  # a list file names the missing target too (a scan would leave it out)
    list_file.write_text("".join(f"images/scene_{i:04d}.png depth/scene_{i:04d}.npy\n" for i in range(5)))
    dataset = build_dataset(DatasetSpec("folder", tmp_path, list_file=list_file), "depth", (24, 32))
    with caplog.at_level(logging.WARNING, logger="train.data"):
        batches = list(DataLoader(dataset, batch_size=5))
    assert len(batches) == 1 and batches[0]["image"].shape == (5, 3, 24, 32)
    paths = [Path(p).name for p in batches[0]["path"]]
    assert paths == ["scene_0000.png", "scene_0002.png", "scene_0002.png", "scene_0004.png", "scene_0004.png"]
    assert batches[0]["skipped"].tolist() == [0, 1, 0, 1, 0]
    assert set(dataset.skipped) == {(truncated, tmp_path / "depth" / "scene_0001.npy"),
                                    (tmp_path / "images" / "scene_0003.png", tmp_path / "depth" / "scene_0003.npy")}
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "scene_0001.png" in messages and "scene_0003.npy" in messages and "skipping unreadable" in messages
    # In worker processes the count travels with the samples.
    fresh = build_dataset(DatasetSpec("folder", tmp_path, list_file=list_file), "depth", (24, 32))
    samples = list(DataLoader(fresh, batch_size=1, num_workers=2))
    assert len(samples) == 5 and sum(int(s["skipped"]) for s in samples) == 2


def test_a_dataset_of_only_unreadable_files_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / f"{i}.png").write_bytes(b"not a png")
        write_npy(tmp_path / "depth" / f"{i}.npy", np.ones((4, 4), dtype=np.float32))
    dataset = build_dataset(DatasetSpec("folder", tmp_path), "depth", (4, 4))
    with pytest.raises(InputError, match="3 unreadable samples and none readable"):
        dataset[0]


def test_a_target_without_valid_pixels_is_skipped(tmp_path):
    write_synthetic_folder(tmp_path, "depth", 2, (16, 16), seed=0)
    write_npy(tmp_path / "depth" / "scene_0000.npy", np.zeros((16, 16), dtype=np.float32))
    dataset = build_dataset(DatasetSpec("folder", tmp_path), "depth", (16, 16))
    assert Path(dataset[0]["path"]).name == "scene_0001.png"
    pair = (tmp_path / "images" / "scene_0000.png", tmp_path / "depth" / "scene_0000.npy")
    assert "no valid pixel" in dataset.skipped[pair]


def test_datasets_pickle_for_spawned_dataloader_workers(tmp_path):
    write_synthetic_folder(tmp_path / "folder", "matting", 2, (16, 16), seed=0)
    write_png(tmp_path / "hs" / "ai_001_001" / "rgb_cam_00_fr0000.png", rgb(3, 4))
    write_png(tmp_path / "hs" / "ai_001_001" / "depth_plane_cam_00_fr0000.png", HYPERSIM_MM)
    for dataset in (build_dataset(DatasetSpec("folder", tmp_path / "folder"), "matting", (16, 16)),
                    build_dataset(DatasetSpec("hypersim_depth", tmp_path / "hs"), "depth", (3, 4))):
        copy = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(copy[0]["target"], dataset[0]["target"])
