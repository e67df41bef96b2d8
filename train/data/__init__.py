"""Training data for ``python -m train``: dataset readers, ratio mixing, matting trimaps and point maps.

``build_dataset(DatasetSpec(kind, root, list_file=None, ratio=1.0), task, size_hw)`` gives a dataset of samples::

    image      float32 [3,H,W] in [-1,1]   the RGB context, resized (aspect not kept) to the training H×W
    target     float32 [3,H,W] in [-1,1]   depth: encoded depth ×3 (near = −1); normal: unit normals (E2P frame);
                                           matting: alpha·2−1 ×3 (binarised at 0.5 unless binarize_alpha=False)
    valid      bool    [H,W]               pixels the losses use (matting: all)
    point_map  float32 [1,H,W] in [0,1]    matting only: the reference gen_points map of the alpha
    trimap     uint8   [H,W] 0/128/255     matting only: the reference gen_trimap
    depth_m    float32 [H,W] metres        depth only
    task, source, path                     str: the task, the dataset kind, the input image file
    skipped    int                         unreadable entries passed over to give this sample (usually 0)

Kinds: the published sets in the reference's layouts (:mod:`train.data.sources`) and the plain ``folder`` format
(:mod:`train.data.folder`). ``MixedBatchSampler`` mixes several datasets by ratio; ``DEFAULT_RATIOS`` holds the
reference's ratios per task.
"""

from .dataset import KINDS, TASKS, DatasetSpec, PerceptionDataset, build_dataset
from .sampler import DEFAULT_RATIOS, MixedBatchSampler

__all__ = ["DEFAULT_RATIOS", "KINDS", "TASKS", "DatasetSpec", "MixedBatchSampler", "PerceptionDataset", "build_dataset"]
