"""Mixing datasets by ratio (MixedBatchSampler), and the matting sample's trimap and point map."""

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from e2p_core.errors import InputError
from train.data import DEFAULT_RATIOS, KINDS, DatasetSpec, MixedBatchSampler, build_dataset
from train.data.matting import gen_trimap
from train_support.synthetic import write_synthetic_folder

SIZES = (40, 25, 9)


def index_datasets() -> list[TensorDataset]:
    """Datasets whose items are their global index in the concatenation, so batches can be traced back."""
    offsets = np.cumsum((0, *SIZES))
    return [TensorDataset(torch.arange(offsets[i], offsets[i + 1])) for i in range(len(SIZES))]


def source_of(index: int) -> int:
    return int(np.searchsorted(np.cumsum(SIZES), index, side="right"))


def test_each_batch_comes_from_one_dataset_and_an_epoch_counts_all_their_batches():
    sampler = MixedBatchSampler(index_datasets(), [0.6, 0.3, 0.1], batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40 // 4 + 25 // 4 + 9 // 4  # drop_last: 10 + 6 + 2
    for batch in batches:
        assert len(batch) == 4 and len({source_of(i) for i in batch}) == 1
    loaded = [b[0].tolist() for b in DataLoader(sampler.dataset, batch_sampler=sampler)]
    assert loaded == batches  # indices into sampler.dataset are the items themselves here


def test_datasets_are_drawn_by_ratio():
    ratios = [0.6, 0.3, 0.1]
    sampler = MixedBatchSampler(index_datasets(), ratios, batch_size=4, seed=123)
    counts = np.zeros(3)
    for epoch in range(150):
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts[source_of(batch[0])] += 1
    draws = counts.sum()
    assert draws == 150 * 18
    for observed, p in zip(counts / draws, ratios):
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / draws)  # binomial: 4 standard deviations


def test_drop_last_and_refill_cover_each_dataset_without_repeats_until_exhausted():
    datasets = index_datasets()
    kept = MixedBatchSampler(datasets, [0, 0, 1], batch_size=4, seed=1, drop_last=True)
    batches = list(kept)
    assert len(batches) == 18 and all(len(b) == 4 for b in batches)
    # Only the 9-item set is drawn: its 2 full batches per pass, reshuffled each refill, never its 9th item twice in
    # a pass: each consecutive pair of batches holds 8 distinct items.
    for first, second in zip(batches[0::2], batches[1::2]):
        assert len(set(first) | set(second)) == 8 and all(source_of(i) == 2 for i in first + second)
    assert len({tuple(b) for b in batches}) > 2  # refills are reshuffled
    full = MixedBatchSampler(datasets, [0, 0, 1], batch_size=4, seed=1, drop_last=False)
    assert len(full) == 10 + 7 + 3
    sizes = [len(b) for b in full]
    assert sorted(set(sizes)) == [1, 4]  # the 9-item set's last batch has one item


def test_epochs_are_reproducible_and_resume_mid_epoch():
    sampler = MixedBatchSampler(index_datasets(), [0.5, 0.3, 0.2], batch_size=3, seed=7)
    sampler.set_epoch(2)
    epoch_two = list(sampler)
    again = MixedBatchSampler(index_datasets(), [0.5, 0.3, 0.2], batch_size=3, seed=7)
    again.set_epoch(2)
    assert list(again) == epoch_two
    again.set_epoch(3)
    assert list(again) != epoch_two
    again.set_epoch(2, start_batch=5)
    assert len(again) == len(epoch_two) - 5 and list(again) == epoch_two[5:]
    other_seed = MixedBatchSampler(index_datasets(), [0.5, 0.3, 0.2], batch_size=3, seed=8)
    other_seed.set_epoch(2)
    assert list(other_seed) != epoch_two


def test_sampler_rejects_bad_ratios_and_too_small_datasets():
    datasets = index_datasets()
    with pytest.raises(InputError, match="one ratio per dataset"):
        MixedBatchSampler(datasets, [1.0, 1.0], batch_size=2, seed=0)
    with pytest.raises(InputError, match="positive sum"):
        MixedBatchSampler(datasets, [0, 0, 0], batch_size=2, seed=0)
    with pytest.raises(InputError, match="fewer samples than the batch size 10"):
        MixedBatchSampler(datasets, [1, 1, 1], batch_size=10, seed=0)
    assert len(MixedBatchSampler(datasets, [1, 1, 0], batch_size=10, seed=0)) == 4 + 2  # ratio 0: never drawn
    with pytest.raises(InputError, match="outside the epoch"):
        MixedBatchSampler(datasets, [1, 1, 1], batch_size=2, seed=0).set_epoch(0, start_batch=100)


def test_reference_ratios_per_task_are_available():
    for task, ratios in DEFAULT_RATIOS.items():
        assert set(ratios) <= set(KINDS)
        assert sum(ratios.values()) == pytest.approx(1.0)
        for kind in ratios:
            with pytest.raises(InputError, match=f"is a {task} dataset"):
                build_dataset(DatasetSpec(kind, "."), "depth" if task != "depth" else "normal", (8, 8))
    assert DEFAULT_RATIOS["depth"] == {"hypersim_depth": 0.9, "vkitti_depth": 0.1}


def test_mixed_folder_datasets_through_a_dataloader(tmp_path):
    write_synthetic_folder(tmp_path / "a", "depth", 4, (16, 24), seed=0)
    write_synthetic_folder(tmp_path / "b", "depth", 6, (16, 24), seed=50)
    datasets = [build_dataset(DatasetSpec("folder", tmp_path / name), "depth", (16, 16)) for name in "ab"]
    sampler = MixedBatchSampler(datasets, [0.5, 0.5], batch_size=2, seed=0)
    batches = list(DataLoader(sampler.dataset, batch_sampler=sampler))
    assert len(batches) == 2 + 3
    for batch in batches:
        assert batch["image"].shape == (2, 3, 16, 16) and batch["depth_m"].shape == (2, 16, 16)
        assert len({p.split("/")[-3] for p in batch["path"]}) == 1  # one dataset per batch


# --- trimap ----------------------------------------------------------------------------------------------------------

def disk_alpha(size: int = 48, radius: float = 12) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return np.clip(radius - np.hypot(rows - size / 2, cols - size / 2), 0, 1).astype(np.float32)


def ellipse_kernel(size: int) -> np.ndarray:
    """OpenCV's MORPH_ELLIPSE element written out from its definition (row half-widths of an inscribed ellipse)."""
    kernel = np.zeros((size, size), dtype=bool)
    radius = size // 2
    for row in range(size):
        dy = row - radius
        if abs(dy) <= radius:
            dx = int(np.rint(radius * np.sqrt((radius * radius - dy * dy) / (radius * radius))))
            kernel[row, max(radius - dx, 0):min(radius + dx + 1, size)] = True
    return kernel


def expected_trimaps(alpha_255: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """The trimap for every (kernel size, iterations) in 5..14 of an alpha in 0..255: erosion/dilation as repeated
    min/max filters over the element, outside the image counting as neither."""
    trimaps = {}
    for size in range(5, 15):
        eroded = dilated = alpha_255.astype(np.float64)
        for iterations in range(1, 15):
            eroded = scipy.ndimage.minimum_filter(eroded, footprint=ellipse_kernel(size), mode="constant", cval=np.inf)
            dilated = scipy.ndimage.maximum_filter(dilated, footprint=ellipse_kernel(size), mode="constant",
                                                   cval=-np.inf)
            if iterations >= 5:
                trimap = np.full(alpha_255.shape, 128, dtype=np.uint8)
                trimap[eroded >= 254] = 255
                trimap[dilated <= 1] = 0
                trimaps[size, iterations] = trimap
    return trimaps


def test_trimap_is_the_reference_erode_dilate_with_random_kernel_and_iterations():
    alpha = disk_alpha(160, 60)
    candidates = expected_trimaps(alpha * 255)
    hit = set()
    for seed in range(40):
        trimap = gen_trimap(alpha, np.random.default_rng(seed))
        assert trimap.dtype == np.uint8 and set(np.unique(trimap)) <= {0, 128, 255}
        matches = {key for key, expected in candidates.items() if np.array_equal(trimap, expected)}
        assert matches, f"seed {seed}: no kernel size/iteration count in 5..14 gives this trimap"
        hit.add(min(matches))
        # The unknown band reaches no further from the edge than the element's offsets (|dx|, |dy| <= size // 2) can
        # travel in ``iterations`` steps; the soft edge itself is 1 px wide.
        reach = max((size // 2) * iterations for size, iterations in matches) * np.sqrt(2) + 1
        distance_to_edge = np.abs(np.hypot(*(np.mgrid[:160, :160] - 80)) - 60)
        assert (distance_to_edge[trimap == 128] <= reach).all()
        # Known regions are really known: FG only where alpha is 1, BG only where it is 0; the edge is unknown.
        assert (alpha[trimap == 255] == 1).all() and (alpha[trimap == 0] == 0).all()
        assert (trimap[(alpha > 0) & (alpha < 1)] == 128).all()
    assert len(hit) > 5  # the width varies: the reference's only augmentation
    assert np.array_equal(gen_trimap(alpha, np.random.default_rng(3)), gen_trimap(alpha, np.random.default_rng(3)))


class FixedDraws:
    """Stands in for the generator's two draws, to pin the kernel size and the iteration count."""

    def __init__(self, size: int, iterations: int):
        self.size, self.iterations = size, iterations

    def choice(self, options):
        assert self.size in options
        return self.size

    def integers(self, low, high):
        assert low <= self.iterations < high
        return self.iterations


def test_trimap_thresholds_fg_at_254_and_bg_at_1_on_the_8_bit_scale():
    alpha_255 = (disk_alpha(160, 60) * 255).round()
    alpha_255[45:78, 45:78], alpha_255[82:115, 82:115] = 254, 253  # inside the disk
    alpha_255[:25, :25], alpha_255[135:, 135:] = 1, 2  # outside
    alpha = (alpha_255 / 255).astype(np.float32)  # as the readers give it
    trimap = gen_trimap(alpha, FixedDraws(5, 5))  # the narrowest band: 5 steps of a radius-2 element
    np.testing.assert_array_equal(trimap, expected_trimaps(alpha_255)[5, 5])
    assert trimap[61, 61] == 255 and trimap[98, 98] == 128  # 254 is foreground, 253 is not
    assert trimap[5, 5] == 0 and trimap[150, 150] == 128  # 1 is background, 2 is not
    widest = gen_trimap(alpha, FixedDraws(14, 14))
    np.testing.assert_array_equal(widest, expected_trimaps(alpha_255)[14, 14])
    assert (widest == 128).all()  # 7·14 px around every edge covers this whole image


# --- point map -------------------------------------------------------------------------------------------------------

def test_matting_samples_carry_ten_gaussian_points_inside_the_foreground(tmp_path):
    size = 64
    (tmp_path / "images").mkdir()
    (tmp_path / "alpha").mkdir()
    Image.fromarray(np.full((size, size, 3), 128, dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray((disk_alpha(size, 10) * 255).astype(np.uint8)).save(tmp_path / "alpha" / "a.png")
    dataset = build_dataset(DatasetSpec("folder", tmp_path), "matting", (size, size))
    sample = dataset[0]
    point_map = sample["point_map"][0].numpy()
    assert point_map.dtype == np.float32 and point_map.min() >= 0 and point_map.max() == 1
    peaks = np.argwhere(point_map == 1)
    assert len(peaks) == 10  # the reference draws exactly 10 points ...
    assert (disk_alpha(size, 10)[tuple(peaks.T)] > 0.8).all()  # ... among the pixels with alpha > 0.8
    # Each point is a peak-1 Gaussian of sigma = 3.9 % of the side (20 px at 512, 30 px at 768), cut off by scipy's
    # separable kernel at |dx|, |dy| > round(4 sigma), and the points are max-combined.
    sigma = 30 * size / 768
    offsets = np.mgrid[:size, :size][None] - peaks[:, :, None, None]
    gaussians = np.exp(-(offsets**2).sum(1) / (2 * sigma**2))
    gaussians[(np.abs(offsets) > int(4 * sigma + 0.5)).any(1)] = 0
    np.testing.assert_allclose(point_map, gaussians.max(0), atol=1e-6)
    # Fixed seed 42: the same points in every epoch, whatever the trimap draws.
    dataset.set_epoch(5)
    assert torch.equal(dataset[0]["point_map"], sample["point_map"])
    assert sample["trimap"].shape == (size, size) and set(sample["trimap"].unique().tolist()) <= {0, 128, 255}
