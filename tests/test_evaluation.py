"""The benchmark runner: suite readers on tiny datasets written in the official layouts, the tiny fixture model run
over them, and ``python -m e2p_core evaluate`` end to end."""

import csv
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, TINY_DIT_CONFIG
from e2p_core.cli import main
from e2p_core.errors import InputError
from e2p_core.evaluation.protocols import FE2E, get_protocol
from e2p_core.evaluation.runner import EvaluationSettings, Model, evaluate_suite, predict_on_ground_truth
from e2p_core.evaluation.suites import SUITES, DataRoot, get_suite
from e2p_core.metrics import POOLED_BIN_DEG, angular_error_metrics, depth_metrics, normal_angular_errors
from e2p_core.pipeline import perceive

FAST = EvaluationSettings(resolution=64)  # the official protocol, at a size the tiny model runs in milliseconds

# ---------------------------------------------------------------------------------------------- synthetic layouts


def _scene(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB [H,W,3], depth in metres [H,W]): smooth gradients that compress well, a slanted plane 1..6 m."""
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([rows, cols, (rows + cols + seed * 0.1) % 1], axis=2)
    depth_m = 1.0 + 5.0 * (0.3 * rows + 0.7 * cols) + 0.2 * seed
    return (rgb * 255).astype(np.uint8), depth_m


def _save(root, name: str, content) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".npy"):
        np.save(path, content)
    else:
        Image.fromarray(content).save(path)


def write_nyuv2(root, n: int = 2) -> None:
    for i in range(n):
        rgb, depth_m = _scene(480, 640, i)
        depth_m[0, 0] = 12.0  # beyond the 10 m cap (and outside the Eigen crop anyway)
        _save(root, f"test/kitchen/rgb_{i:04d}.png", rgb)
        _save(root, f"test/kitchen/depth_{i:04d}.png", np.round(depth_m * 1000).astype(np.uint16))
        _save(root, f"test/kitchen/filled_{i:04d}.png", np.round(depth_m * 1000).astype(np.uint16))
    _save(root, "train/office/rgb_0100.png", rgb)  # the labeled archive's training half: never evaluated
    _save(root, "train/office/depth_0100.png", np.round(depth_m * 1000).astype(np.uint16))


def write_kitti(root) -> None:
    rgb, depth_m = _scene(375, 1242, 0)
    sparse = np.where(np.random.default_rng(0).random(depth_m.shape) < 0.3, depth_m * 10, 0.0)  # LiDAR: 30% hits
    _save(root, "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png", rgb)
    _save(root, "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png",
          np.round(sparse * 256).astype(np.uint16))


def write_eth3d(root) -> None:
    """The layout of Marigold's eth3d.tar: each scene's DSLR images and its unpacked ``<scene>_dslr_depth`` archive."""
    rgb, depth_m = _scene(40, 60, 0)
    depth_m = depth_m.astype("<f4")  # raw little-endian float32, the image's size
    depth_m[:, 0] = np.inf  # no measurement
    _save(root, "rgb/courtyard/images/dslr_images/DSC_0001.JPG", rgb)
    _save(root, "depth/courtyard_dslr_depth/courtyard/ground_truth_depth/dslr_images/DSC_0001.JPG", depth_m.tobytes())
    _save(root, "rgb/courtyard/images/dslr_images/DSC_0002.JPG", rgb)  # no depth file: not a sample


def write_scannet(root) -> None:
    rgb, depth_m = _scene(48, 64, 0)
    _save(root, "scene0000_00/color/000000.jpg", rgb)
    _save(root, "scene0000_00/depth/000000.png", np.round(depth_m * 1000).astype(np.uint16))


def write_diode(root) -> None:
    rgb, depth_m = _scene(48, 64, 0)
    mask = np.ones(depth_m.shape, dtype=np.float32)
    mask[:4] = 0
    stem = "indoors/scene_00019/scan_00183/00019_00183_indoors_000_010"
    _save(root, f"{stem}.png", rgb)
    _save(root, f"{stem}_depth.npy", depth_m[..., None].astype(np.float32))
    _save(root, f"{stem}_depth_mask.npy", mask)


def write_normals(root, n: int = 2) -> None:
    for i in range(n):
        rgb, _ = _scene(40 + 8 * i, 56, i)  # different sizes: pooled and per-image averages differ
        normals = np.zeros((*rgb.shape[:2], 3), dtype=np.float32)
        normals[..., 0], normals[..., 2] = 0.6, 0.8  # Marigold frame (+x right): E2P reads x = -0.6
        normals[:3] = 0  # no ground truth
        _save(root, f"scene_{i}/frame_{i:04d}_img.png", rgb)
        _save(root, f"scene_{i}/frame_{i:04d}_normal.npy", normals)


def write_diode_normals(root) -> None:
    """Marigold's DIODE normal set: ``X.png`` with ``X_normal.npy`` (no ``_img`` suffix)."""
    rgb, _ = _scene(48, 64, 0)
    normals = np.zeros((48, 64, 3), dtype=np.float32)
    normals[..., 1], normals[..., 2] = 0.6, 0.8
    stem = "val/outdoor/scene_00024/scan_00201/00024_00201_outdoor_070_030"
    _save(root, f"{stem}.png", rgb)
    _save(root, f"{stem}_normal.npy", normals)
    _save(root, f"{stem}_depth.npy", np.ones((48, 64, 1), dtype=np.float32))  # the depth files next to them: ignored


def write_dsine_normals(root) -> None:
    """DSINE's evaluation layout (what FE2E reads): ``X_img.png`` with an 8-bit ``X_normal.png`` and intrinsics."""
    rgb, _ = _scene(40, 56, 0)
    encoded = np.zeros((40, 56, 3), dtype=np.uint8)
    encoded[..., 0], encoded[..., 1], encoded[..., 2] = 153, 128, 230  # (n+1)/2·255 of about (0.2, 0.0, 0.8)
    encoded[:2] = 0  # black: no ground truth
    _save(root, "test/000000_img.png", rgb)
    _save(root, "test/000000_normal.png", encoded)
    _save(root, "test/000000_intrins.npy", np.eye(3, dtype=np.float32))


def write_matting(root, image_folder: str = "original_image") -> None:
    rgb, _ = _scene(48, 64, 0)
    alpha = np.zeros(rgb.shape[:2], dtype=np.uint8)
    alpha[10:40, 16:48] = 255
    alpha[10:40, 14:16] = 128  # a soft edge
    _save(root, f"{image_folder}/p_0001.jpg", rgb)
    _save(root, "mask/p_0001.png", alpha)
    _save(root, "trimap/p_0001.png", alpha)


def as_tar(folder, path):
    """Pack ``folder`` as Marigold packs its archives: members named ``./relative/path``."""
    with tarfile.open(path, "w") as tar:
        tar.add(folder, arcname=".")
    return path


# --------------------------------------------------------------------------------------------------------- readers


def test_nyuv2_reader_scales_millimetres_applies_the_eigen_crop_and_skips_train(tmp_path):
    write_nyuv2(tmp_path)
    suite = get_suite("depth", "nyuv2")
    with DataRoot(tmp_path) as root:
        rows = suite.rows(root)
        assert [row[0] for row in rows] == ["test/kitchen/rgb_0000.png", "test/kitchen/rgb_0001.png"]
        sample = suite.load(root, rows[0])
    _, depth_m = _scene(480, 640, 0)
    assert sample.image.shape == (480, 640, 3) and sample.region is None
    np.testing.assert_allclose(sample.target[1:], depth_m[1:], atol=5e-4)  # mm rounding
    assert sample.valid.sum() == (471 - 45) * (601 - 41)  # every in-range pixel inside the crop, none outside
    assert sample.valid[45, 41] and not sample.valid[44, 41] and not sample.valid[45, 601]


def test_kitti_reader_cuts_the_benchmark_crop_and_masks_eigen_and_range(tmp_path):
    write_kitti(tmp_path)
    suite = get_suite("depth", "kitti")
    with DataRoot(tmp_path) as root:
        (row,) = suite.rows(root)
        sample = suite.load(root, row)
    full_rgb, _ = _scene(375, 1242, 0)
    top, left = 375 - 352, (1242 - 1216) // 2  # 23, 13
    assert sample.region == (top, left, 352, 1216)
    np.testing.assert_array_equal(sample.image, full_rgb[top:top + 352, left:left + 1216])
    expected = np.zeros((375, 1242), dtype=bool)
    expected[int(0.3324324 * 375):int(0.91351351 * 375), int(0.0359477 * 1242):int(0.96405229 * 1242)] = True
    expected &= (sample.target > 1e-3) & (sample.target < 80)
    expected[:top] = False
    np.testing.assert_array_equal(sample.valid, expected)


def test_eth3d_scannet_diode_readers(tmp_path):
    write_eth3d(tmp_path / "eth3d")
    write_scannet(tmp_path / "scannet")
    write_diode(tmp_path / "diode")
    for name, height, invalid in (("eth3d", 40, 40), ("scannet", 48, 0), ("diode", 48, 4 * 64)):
        suite = get_suite("depth", name)
        with DataRoot(tmp_path / name) as root:
            (row,) = suite.rows(root)
            sample = suite.load(root, row)
        _, depth_m = _scene(height, sample.image.shape[1], 0)
        assert sample.valid.size - sample.valid.sum() == invalid, name
        np.testing.assert_allclose(sample.target[sample.valid], depth_m[sample.valid], atol=5e-4)


def test_normal_reader_negates_x_and_masks_missing_normals(tmp_path):
    write_normals(tmp_path)
    suite = get_suite("normal", "ibims")
    with DataRoot(tmp_path) as root:
        rows = suite.rows(root)
        sample = suite.load(root, rows[0])
    assert rows[0] == ["scene_0/frame_0000_img.png", "scene_0/frame_0000_normal.npy"]
    assert sample.target.shape == (3, 40, 56)
    np.testing.assert_allclose(sample.target[:, 10, 10], [-0.6, 0.0, 0.8], atol=1e-6)
    assert not sample.valid[:3].any() and sample.valid[3:].all()


@pytest.mark.parametrize("image_folder", ["original_image", "original"])  # P3M-500-NP; AM-2k and AIM-500
def test_matting_reader_pairs_images_and_masks_by_stem(tmp_path, image_folder):
    write_matting(tmp_path / "validation" / "P3M-500-NP", image_folder)
    suite = get_suite("matting", "p3m500np")
    with DataRoot(tmp_path) as root:
        (row,) = suite.rows(root)
        sample = suite.load(root, row)
    assert row == [f"validation/P3M-500-NP/{image_folder}/p_0001.jpg", "validation/P3M-500-NP/mask/p_0001.png"]
    assert sample.target[20, 20] == 1.0 and sample.target[20, 15] == pytest.approx(128 / 255)
    assert sample.target[0, 0] == 0.0 and sample.valid.all()


def test_fe2e_protocol_reads_kitti_on_the_crop_and_diode_by_its_mask(tmp_path):
    write_kitti(tmp_path / "kitti")
    write_diode(tmp_path / "diode")
    write_eth3d(tmp_path / "eth3d")
    with DataRoot(tmp_path / "kitti") as root:
        suite = get_suite("depth", "kitti")
        sample = suite.load(root, suite.rows(root)[0], FE2E)
    full_rgb, _ = _scene(375, 1242, 0)
    np.testing.assert_array_equal(sample.image, full_rgb[23:, 13:13 + 1216])
    assert sample.region is None and sample.target.shape == (352, 1216)
    eigen = np.zeros((352, 1216), dtype=bool)  # Marigold: the Eigen fractions of the 352x1216 crop
    eigen[int(0.3324324 * 352):int(0.91351351 * 352), int(0.0359477 * 1216):int(0.96405229 * 1216)] = True
    np.testing.assert_array_equal(sample.valid, eigen & (sample.target > 1e-5) & (sample.target < 80))
    with DataRoot(tmp_path / "diode") as root:
        suite = get_suite("depth", "diode")
        row = suite.rows(root)[0]
        depth_m = _scene(48, 64, 0)[1]
        np.save(tmp_path / "diode" / row[1], np.where(depth_m > 3, 90.0, depth_m)[..., None].astype(np.float32))
        fe2e, e2p = suite.load(root, row, FE2E), suite.load(root, row)
    assert fe2e.valid.sum() == 44 * 64  # the mask alone (its first 4 rows are 0), 90 m included
    assert e2p.valid.sum() == (fe2e.valid & (fe2e.target < 80)).sum() < fe2e.valid.sum()  # E2P: < 80 m
    with DataRoot(tmp_path / "eth3d") as root:
        suite = get_suite("depth", "eth3d")
        assert suite.load(root, suite.rows(root)[0], FE2E).valid.sum() == 40 * 59  # inf -> 0 -> invalid


def test_tar_archive_reads_like_the_folder(tmp_path):
    write_nyuv2(tmp_path / "nyu")
    suite = get_suite("depth", "nyuv2")
    with DataRoot(tmp_path / "nyu") as folder, DataRoot(as_tar(tmp_path / "nyu", tmp_path / "nyu.tar")) as archive:
        assert suite.rows(archive) == suite.rows(folder)
        from_folder, from_tar = (suite.load(root, suite.rows(root)[1]) for root in (folder, archive))
    np.testing.assert_array_equal(from_tar.image, from_folder.image)
    np.testing.assert_array_equal(from_tar.target, from_folder.target)


def test_list_files_skip_rows_without_ground_truth_and_reject_short_rows(tmp_path):
    write_kitti(tmp_path)
    listing = tmp_path / "eigen_test_files_with_gt.txt"
    listing.write_text("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png "
                       "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377\n"
                       "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000070.png None 721.5377\n")
    suite = get_suite("depth", "kitti")
    with DataRoot(tmp_path) as root:
        assert len(suite.rows(root, listing)) == 1
        listing.write_text("only_one_column.png\n")
        with pytest.raises(InputError, match="fewer than 2 columns"):
            suite.rows(root, listing)
        with pytest.raises(InputError, match="no DIODE samples"):
            get_suite("depth", "diode").rows(root)
    with pytest.raises(InputError, match="neither a folder nor a tar"):
        DataRoot(listing)
    with pytest.raises(InputError, match="no matting suite named 'nyuv2'"):
        get_suite("matting", "nyuv2")


def discover_the_one_sample(folder, task: str, suite_name: str):
    """(row, sample) of the only sample discovery finds in ``folder``, without a filename list."""
    suite = get_suite(task, suite_name)
    with DataRoot(folder) as root:
        (row,) = suite.rows(root)
        return row, suite.load(root, row)


def test_eth3d_is_found_in_its_real_layout_and_read_as_raw_float32(tmp_path):
    write_eth3d(tmp_path)
    row, sample = discover_the_one_sample(tmp_path, "depth", "eth3d")
    assert row == ["rgb/courtyard/images/dslr_images/DSC_0001.JPG",
                   "depth/courtyard_dslr_depth/courtyard/ground_truth_depth/dslr_images/DSC_0001.JPG"]
    expected = _scene(40, 60, 0)[1].astype(np.float32)
    assert sample.target.dtype == np.float32 and sample.target[0, 0] == 0.0  # inf: no depth
    np.testing.assert_array_equal(sample.target[:, 1:], expected[:, 1:])
    assert not sample.valid[:, 0].any() and sample.valid[:, 1:].all()


def test_diode_normals_are_found_without_the_img_suffix(tmp_path):
    write_diode_normals(tmp_path)
    row, sample = discover_the_one_sample(tmp_path, "normal", "diode")
    stem = "val/outdoor/scene_00024/scan_00201/00024_00201_outdoor_070_030"
    assert row == [f"{stem}.png", f"{stem}_normal.npy"]
    np.testing.assert_allclose(sample.target[:, 5, 5], [0.0, 0.6, 0.8], atol=1e-6)
    assert sample.valid.all()


def test_dsine_normal_pngs_are_read_as_stored(tmp_path):
    write_dsine_normals(tmp_path)
    row, sample = discover_the_one_sample(tmp_path, "normal", "nyuv2")
    assert row == ["test/000000_img.png", "test/000000_normal.png"]
    split = tmp_path / "test.txt"  # DSINE's split files name the image only
    split.write_text("test/000000_img.png\n")
    with DataRoot(tmp_path) as root:
        suite = get_suite("normal", "nyuv2")
        np.testing.assert_array_equal(suite.load(root, suite.rows(root, split)[0]).target, sample.target)
    np.testing.assert_allclose(sample.target[:, 10, 10], [153 / 255 * 2 - 1, 128 / 255 * 2 - 1, 230 / 255 * 2 - 1],
                               atol=1e-6)  # no x flip: DSINE's PNGs are in the frame FE2E compares in
    assert not sample.valid[:2].any() and sample.valid[2:].all()


def test_am2k_evaluates_validation_only_and_says_so(tmp_path):
    for split, n in (("train", 3), ("validation", 2)):
        for i in range(n):
            rgb, _ = _scene(24, 32, i)
            _save(tmp_path, f"AM-2k/{split}/original/m_{split}{i}.jpg", rgb)
            _save(tmp_path, f"AM-2k/{split}/mask/m_{split}{i}.png", np.full((24, 32), 255, np.uint8))
            if split == "validation":
                _save(tmp_path, f"AM-2k/{split}/trimap/m_{split}{i}.png", np.full((24, 32), 128, np.uint8))
    suite = get_suite("matting", "am2k")
    with DataRoot(tmp_path) as root:
        rows, note = suite.find(root)
    assert [row[0] for row in rows] == ["AM-2k/validation/original/m_validation0.jpg",
                                        "AM-2k/validation/original/m_validation1.jpg"]
    assert "validation/ only: 2 images; 3 others (train/) were left out" == note
    with DataRoot(tmp_path / "AM-2k" / "validation") as root:  # the validation folder itself: nothing left out
        assert len(suite.find(root)[0]) == 2 and suite.find(root)[1] is None
    import shutil

    shutil.rmtree(tmp_path / "AM-2k" / "validation")
    with DataRoot(tmp_path) as root, pytest.raises(InputError, match="only train"):
        suite.find(root)


def test_every_task_has_its_standard_suites():
    assert {name for task, name in SUITES if task == "depth"} == {"nyuv2", "kitti", "eth3d", "scannet", "diode"}
    # Sintel is Edit2Perceive normal TRAINING data (and DSINE stores it as .exr): not a zero-shot benchmark.
    assert {name for task, name in SUITES if task == "normal"} == {"nyuv2", "scannet", "ibims", "diode"}
    assert {name for task, name in SUITES if task == "matting"} == {"p3m500np", "am2k", "aim500"}


# ------------------------------------------------------------------------------------------- running the model


@pytest.fixture(scope="module")
def tiny_backend():
    from e2p_core.backends.diffusers_backend import load_diffusers_backend
    from e2p_core.weights import load_dit, load_vae

    dit = load_dit(FIXTURES / "dit_bfl.safetensors", TINY_DIT_CONFIG)
    return load_diffusers_backend(dit, load_vae(FIXTURES / "vae_bfl.safetensors"), torch.float32, "cpu")


def tiny_model(task, tiny_backend, prompt_files) -> Model:
    from e2p_core.prompts import load_prompt_embeddings

    return Model(task, *tiny_backend, load_prompt_embeddings(prompt_files[task]))


def _resize_align_corners(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize [C,h,w] -> [C,H,W] with corner pixels aligned, written out with numpy."""
    _, h, w = values.shape
    ys, xs = np.linspace(0, h - 1, height), np.linspace(0, w - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = values[:, y0][:, :, x0] * (1 - wx) + values[:, y0][:, :, x1] * wx
    bottom = values[:, y1][:, :, x0] * (1 - wx) + values[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def test_kitti_prediction_is_resized_like_the_official_script_and_pasted_into_the_frame(tmp_path, tiny_backend,
                                                                                       prompt_files):
    write_kitti(tmp_path)
    suite, model = get_suite("depth", "kitti"), tiny_model("depth", tiny_backend, prompt_files)
    with DataRoot(tmp_path) as root:
        sample = suite.load(root, suite.rows(root)[0])
    prediction = predict_on_ground_truth(model, sample, FAST)
    assert prediction.shape == (1, 375, 1242)
    direct = perceive(model.denoiser, model.codec, sample.image, "depth", model.prompt, resize="reference",
                      resolution=64)
    expected = _resize_align_corners(direct.postprocessed[0].double().numpy(), 352, 1216)
    np.testing.assert_allclose(prediction[:, 23:, 13:13 + 1216].numpy(), expected, atol=1e-5)
    assert prediction[:, :23].abs().sum() == 0 and prediction[:, :, :13].abs().sum() == 0


def test_depth_suite_averages_per_image_metrics_and_reports_skipped_samples(tmp_path, tiny_backend, prompt_files):
    write_nyuv2(tmp_path)
    (tmp_path / "test/kitchen/rgb_0002.png").write_bytes(b"not a png")  # a corrupt sample: skipped, not fatal
    _save(tmp_path, "test/kitchen/depth_0002.png", np.zeros((480, 640), dtype=np.uint16))
    _save(tmp_path, "test/kitchen/rgb_0003.png", _scene(480, 640, 3)[0])
    _save(tmp_path, "test/kitchen/depth_0003.png", np.zeros((480, 640), dtype=np.uint16))  # no valid pixel
    suite, model = get_suite("depth", "nyuv2"), tiny_model("depth", tiny_backend, prompt_files)
    result = evaluate_suite(model, suite, tmp_path, settings=FAST)
    assert [name for name, _ in result.per_image] == ["test/kitchen/rgb_0000.png", "test/kitchen/rgb_0001.png"]
    assert [name for name, _ in result.skipped] == ["test/kitchen/rgb_0002.png", "test/kitchen/rgb_0003.png"]
    assert "valid depth pixels" in result.skipped[1][1]
    with DataRoot(tmp_path) as root:
        sample = suite.load(root, suite.rows(root)[1])
    prediction = predict_on_ground_truth(model, sample, FAST)
    assert result.per_image[1][1] == pytest.approx(depth_metrics(prediction[0], sample.target, sample.valid,
                                                                 "sqrt", 1e-3, 10.0))
    for key, value in result.metrics.items():
        assert value == pytest.approx(np.mean([metrics[key] for _, metrics in result.per_image])), key
    linear = evaluate_suite(model, suite, tmp_path, settings=EvaluationSettings(
        resolution=64, protocol=get_protocol("e2p", depth_space="uniform")))
    assert linear.metrics["abs_rel"] != pytest.approx(result.metrics["abs_rel"])
    first = evaluate_suite(model, suite, tmp_path, settings=EvaluationSettings(resolution=64, limit=1))
    assert first.metrics == pytest.approx(result.per_image[0][1])


def test_normal_suite_pools_pixels_on_request(tmp_path, tiny_backend, prompt_files):
    write_normals(tmp_path)
    suite, model = get_suite("normal", "nyuv2"), tiny_model("normal", tiny_backend, prompt_files)
    per_image = evaluate_suite(model, suite, tmp_path, settings=FAST)
    pooled = evaluate_suite(model, suite, tmp_path, settings=EvaluationSettings(
        resolution=64, protocol=get_protocol("e2p", normal_aggregation="pooled")))
    errors = []
    with DataRoot(tmp_path) as root:
        for row in suite.rows(root):
            sample = suite.load(root, row)
            errors.append(normal_angular_errors(predict_on_ground_truth(model, sample, FAST), sample.target,
                                                sample.valid))
    exact = angular_error_metrics(torch.cat(errors))
    assert abs(pooled.metrics.pop("median") - exact.pop("median")) <= POOLED_BIN_DEG / 2
    assert pooled.metrics == pytest.approx(exact)
    assert per_image.metrics["mean"] == pytest.approx(np.mean([e.mean().item() for e in errors]))
    assert per_image.metrics["mean"] != pytest.approx(pooled.metrics["mean"])  # images of different sizes


def test_fe2e_normals_are_resized_half_pixel_renormalised_and_pooled(tmp_path, tiny_backend, prompt_files,
                                                                     monkeypatch):
    write_dsine_normals(tmp_path)
    write_normals(tmp_path / "more")
    suite, model = get_suite("normal", "nyuv2"), tiny_model("normal", tiny_backend, prompt_files)
    settings = EvaluationSettings(resolution=64, protocol=FE2E)
    import e2p_core.pipeline

    def no_restore(*args, **kwargs):
        raise AssertionError("the evaluation resized a prediction to the input size and threw it away")

    monkeypatch.setattr(e2p_core.pipeline, "restore", no_restore)
    result = evaluate_suite(model, suite, tmp_path, settings=settings)
    errors = []
    with DataRoot(tmp_path) as root:
        rows = suite.rows(root)
        assert len(rows) == 3 and len(result.per_image) == 3
        for row in rows:
            sample = suite.load(root, row, FE2E)
            output = perceive(model.denoiser, model.codec, sample.image, "normal", model.prompt, resize="reference",
                              resolution=64, restore_output=False)
            assert output.output is None
            resized = torch.nn.functional.interpolate(output.postprocessed, size=sample.valid.shape, mode="bilinear",
                                                      align_corners=False)[0]
            resized = resized / resized.norm(dim=0, keepdim=True)
            errors.append(normal_angular_errors(resized, sample.target, sample.valid))
    exact = angular_error_metrics(torch.cat(errors))
    assert abs(result.metrics.pop("median") - exact.pop("median")) <= POOLED_BIN_DEG / 2
    assert result.metrics == pytest.approx(exact, rel=1e-6)


def test_matting_suite_runs_with_simulated_clicks(tmp_path, tiny_backend, prompt_files):
    write_matting(tmp_path, "original")
    model = tiny_model("matting", tiny_backend, prompt_files)
    result = evaluate_suite(model, get_suite("matting", "aim500"), tmp_path, settings=FAST)
    assert len(result.per_image) == 1 and all(np.isfinite(list(result.metrics.values())))
    assert 0 < result.metrics["mse"] <= 1 and result.metrics["sad"] == pytest.approx(result.metrics["mad"] * 48 * 64
                                                                                    / 1000)
    with pytest.raises(InputError, match="depth benchmark"):
        evaluate_suite(model, get_suite("depth", "nyuv2"), tmp_path, settings=FAST)


# ------------------------------------------------------------------------------------------------------------ CLI


def cli_args(tmp_path, prompt_files, dit_config_file, task="depth") -> list[str]:
    return ["evaluate", "--task", task, "--dit", str(FIXTURES / "dit_bfl.safetensors"), "--dit-config",
            str(dit_config_file), "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds",
            str(prompt_files[task]), "--resolution", "64", "--dtype", "fp32", "--device", "cpu",
            "--out-dir", str(tmp_path / "report"), "--name", "tiny"]


def test_cli_writes_the_paper_table_and_csv(tmp_path, prompt_files, dit_config_file, capsys):
    write_nyuv2(tmp_path / "nyu")
    write_kitti(tmp_path / "kitti")
    nyu_tar = as_tar(tmp_path / "nyu", tmp_path / "nyu_labeled_extracted.tar")
    kitti_list = tmp_path / "eigen_test_files_with_gt.txt"  # Marigold's list: a frame without ground truth too
    kitti_list.write_text("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png "
                          "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377\n"
                          "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000070.png None 721.5377\n")
    args = cli_args(tmp_path, prompt_files, dit_config_file)
    assert main([*args, "--suite", "nyuv2", "--data-root", str(nyu_tar), "--list-file", "auto",
                 "--suite", "kitti", "--data-root", str(tmp_path / "kitti"), "--list-file", str(kitti_list)]) == 0
    report = tmp_path / "report"
    with open(report / "results.csv", newline="") as handle:
        summary = {(row["suite"], row["metric"]): row for row in csv.DictReader(handle)}
    with open(report / "per_image.csv", newline="") as handle:
        per_image = list(csv.DictReader(handle))
    nyu_abs_rel = [float(row["abs_rel"]) for row in per_image if row["suite"] == "nyuv2"]
    assert len(nyu_abs_rel) == 2 and summary[("nyuv2", "abs_rel")]["images"] == "2"
    assert summary[("kitti", "abs_rel")]["images"] == "1" and summary[("kitti", "abs_rel")]["skipped"] == "0"
    assert float(summary[("nyuv2", "abs_rel")]["value"]) == pytest.approx(np.mean(nyu_abs_rel))
    markdown = (report / "results.md").read_text()
    header, _, row = markdown.split("\n\n")[1].splitlines()
    assert header == "| Method | NYUv2 AbsRel↓ | NYUv2 δ1↑ | KITTI AbsRel↓ | KITTI δ1↑ |"
    kitti_delta1 = float(summary[("kitti", "delta1")]["value"])
    assert row.split(" | ")[4].rstrip(" |") == f"{kitti_delta1 * 100:.1f}"
    assert "sqrt depth space" in markdown and markdown in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--suite", "nyuv2", "--data-root", "a", "--data-root", "b"], "one --data-root per --suite"),
    (["--suite", "nyuv2", "--data-root", "/nowhere/nyu.tar"], "/nowhere/nyu.tar"),
])
def test_cli_rejects_bad_suite_arguments_before_loading(tmp_path, prompt_files, dit_config_file, capsys, extra,
                                                        fragment):
    assert main([*cli_args(tmp_path, prompt_files, dit_config_file), *extra]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_cli_rejects_a_suite_of_another_task(tmp_path, prompt_files, dit_config_file, capsys):
    args = cli_args(tmp_path, prompt_files, dit_config_file, task="matting")
    assert main([*args, "--suite", "kitti", "--data-root", str(tmp_path)]) == 2
    assert "no matting suite named 'kitti'" in capsys.readouterr().err


def test_cli_matting_report_names_the_conn_and_the_am2k_scope(tmp_path, prompt_files, dit_config_file):
    write_matting(tmp_path / "am2k" / "validation", "original")
    write_matting(tmp_path / "am2k" / "train", "original")
    args = cli_args(tmp_path, prompt_files, dit_config_file, task="matting")
    assert main([*args, "--suite", "am2k", "--data-root", str(tmp_path / "am2k")]) == 0
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "Conn with the most frequent label component" in markdown
    assert "* AM-2k: validation/ only: 1 images; 1 others (train/) were left out" in markdown
    assert main([*args, "--suite", "am2k", "--data-root", str(tmp_path / "am2k"),
                 "--conn-component", "largest_foreground"]) == 0
    with open(tmp_path / "report" / "results.csv", newline="") as handle:
        conn = next(row for row in csv.DictReader(handle) if row["metric"] == "conn")
    assert "changed: conn component largest_foreground" in conn["protocol"] and conn["images"] == "1"


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--task", "matting", "--protocol", "fe2e"], "FE2E protocol has no matting"),
    (["--protocol", "fe2e", "--depth-space", "uniform"], "FE2E protocol is fixed"),
])
def test_cli_rejects_protocol_misuse_before_loading(tmp_path, prompt_files, dit_config_file, capsys, extra, fragment):
    args = [*cli_args(tmp_path, prompt_files, dit_config_file), "--suite", "nyuv2", "--data-root", str(tmp_path)]
    if "matting" in extra:
        args = [*cli_args(tmp_path, prompt_files, dit_config_file, task="matting"), "--suite", "am2k",
                "--data-root", str(tmp_path)]
        extra = extra[2:]
    assert main([*args, *extra]) == 2
    assert fragment in capsys.readouterr().err
