"""``evaluate --model fe2e``: the depth and the normal suites scored from FE2E's one pass, under FE2E's protocol."""

import pytest
import torch

from e2p_core.cli import main
from e2p_core.evaluation.protocols import FE2E
from e2p_core.evaluation.runner import EvaluationSettings, Model, evaluate_suite
from e2p_core.evaluation.suites import DataRoot, get_suite
from e2p_core.fe2e import perceive_fe2e
from e2p_core.metrics import angular_error_metrics, normal_angular_errors
from fe2e_support import DIT, DIT_CONFIG, LORA, PROMPT_CACHE, VAE, VAE_CONFIG, fe2e_models, prompt_cache
from test_evaluation import write_dsine_normals, write_nyuv2

SETTINGS = EvaluationSettings(seed=1234, resolution=(48, 64), protocol=FE2E)


@pytest.mark.parametrize("task", ["depth", "normal"])
def test_fe2e_suite_scores_the_map_of_its_task(tmp_path, task):
    (write_nyuv2 if task == "depth" else write_dsine_normals)(tmp_path)
    denoiser, codec = fe2e_models(torch.float32, True)
    model = Model(task, denoiser, codec, prompt_cache(), family="fe2e")
    suite = get_suite(task, "nyuv2")
    result = evaluate_suite(model, suite, tmp_path, settings=SETTINGS)
    with DataRoot(tmp_path) as root:
        sample = suite.load(root, suite.rows(root)[0], FE2E)
    fe2e = perceive_fe2e(denoiser, codec, sample.image, prompt_cache(), seed=1234, resolution=(48, 64))
    maps = fe2e.depth_processing if task == "depth" else fe2e.normal_processing
    resized = torch.nn.functional.interpolate(maps, size=sample.valid.shape, mode="bilinear", align_corners=False)[0]
    if task == "depth":
        expected = FE2E.depth_metrics(resized[0], sample.target, sample.valid, "nyuv2")
    else:
        resized = resized / resized.norm(dim=0, keepdim=True).clamp_min(1e-9)
        expected = angular_error_metrics(normal_angular_errors(resized, sample.target, sample.valid))
    name, metrics = result.per_image[0]
    assert name == sample.name and metrics == pytest.approx(expected, rel=1e-6)


def test_evaluate_cli_runs_fe2e_with_its_protocol(tmp_path, capsys):
    write_nyuv2(tmp_path / "nyu", n=1)
    argv = ["evaluate", "--model", "fe2e", "--task", "depth", "--suite", "nyuv2", "--data-root", str(tmp_path / "nyu"),
            "--dit", str(DIT), "--dit-config", str(DIT_CONFIG), "--lora", str(LORA), "--vae", str(VAE),
            "--vae-config", str(VAE_CONFIG), "--prompt-cache", str(PROMPT_CACHE), "--resolution", "64x48",
            "--dtype", "fp32", "--device", "cpu", "--out-dir", str(tmp_path / "report"), "--name", "tiny"]
    assert main(argv) == 0
    report = (tmp_path / "report" / "results.md").read_text()
    assert "FE2E" in report and "tiny" in report
    missing = [*argv, "--prompt-cache", str(tmp_path / "none.npz")]  # argparse: the last one wins
    assert main(missing) == 2 and "does not exist" in capsys.readouterr().err
