"""``predict`` on a folder of frames and on a video file (streamed, temporally aligned depth), and --tiles."""

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from e2p_core import cli_sequence
from e2p_core.cli import main

SIZE_WH = (56, 40)


def base_args(tmp_path, prompt_files, dit_config_file, image, out, *extra):
    return ["predict", "--task", "depth", "--dit", str(FIXTURES / "dit_bfl.safetensors"), "--dit-config",
            str(dit_config_file), "--vae", str(FIXTURES / "vae_bfl.safetensors"), "--prompt-embeds",
            str(prompt_files["depth"]), "--dtype", "fp32", "--device", "cpu", "--resolution", "64",
            "--image", str(image), "--out", str(out), *extra]


def write_frames(folder, count):
    folder.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (SIZE_WH[1], SIZE_WH[0], 3), dtype=np.uint8)
    for index in range(count):
        frame = np.roll(base, index, axis=1)  # a panning camera
        Image.fromarray(frame).save(folder / f"f{index:03d}.png")
    return folder


def test_folder_of_frames_streams_in_chunks_and_writes_every_frame(tmp_path, prompt_files, dit_config_file,
                                                                   monkeypatch):
    frames = write_frames(tmp_path / "frames", 5)
    alive, read = [], []
    original_chunks = cli_sequence.chunks

    def counting_chunks(stream, size):
        def counted():
            for item in stream:
                read.append(item[0])
                yield item
        for chunk in original_chunks(counted(), size):
            alive.append(len(chunk))
            yield chunk

    monkeypatch.setattr(cli_sequence, "chunks", counting_chunks)
    matched_with = []  # the images the alignment matches frames with (optical flow): each frame's own

    class RecordingAligner(cli_sequence.TemporalAligner):
        def push(self, prediction, image=None):
            matched_with.append(image)
            return super().push(prediction, image)

    monkeypatch.setattr(cli_sequence, "TemporalAligner", RecordingAligner)
    out = tmp_path / "depth"
    assert main(base_args(tmp_path, prompt_files, dit_config_file, frames, out, "--chunk-size", "2")) == 0
    assert len(matched_with) == 5
    for index, image in enumerate(matched_with):
        np.testing.assert_array_equal(image, np.asarray(Image.open(frames / f"f{index:03d}.png")))
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"f{index:03d}.png" for index in range(5)]  # no temporary file left behind
    assert max(alive) == 2 and read == [f"f{index:03d}" for index in range(5)]
    depths = np.stack([np.asarray(Image.open(out / name), dtype=np.float64) / 65535 for name in written])
    assert depths.shape == (5, SIZE_WH[1], SIZE_WH[0])
    assert depths.min() == 0 and depths.max() == 1  # one normalisation for the whole clip (hint: near = white)


def test_video_file_gives_the_frames_of_the_same_folder(tmp_path, prompt_files, dit_config_file):
    cv2 = pytest.importorskip("cv2")  # in the test extra; the CLI's own error covers a missing OpenCV
    frames = write_frames(tmp_path / "frames", 3)
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 24, SIZE_WH)  # lossless
    for path in sorted(frames.iterdir()):
        writer.write(cv2.cvtColor(np.asarray(Image.open(path)), cv2.COLOR_RGB2BGR))
    writer.release()
    out_video, out_folder = tmp_path / "from_video", tmp_path / "from_folder"
    args = ("--temporal", "independent", "--sequence-format", "npy")
    assert main(base_args(tmp_path, prompt_files, dit_config_file, video, out_video, *args)) == 0
    assert main(base_args(tmp_path, prompt_files, dit_config_file, frames, out_folder, *args)) == 0
    from_video = [np.load(p) for p in sorted(out_video.iterdir())]
    from_folder = [np.load(p) for p in sorted(out_folder.iterdir())]
    assert len(from_video) == 3 and sorted(p.name for p in out_video.iterdir())[0] == "frame_000000.npy"
    for a, b in zip(from_video, from_folder):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_tiles_on_one_image_and_bad_sequence_arguments(tmp_path, prompt_files, dit_config_file, capsys):
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 131, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "tiled.npy"
    assert main(base_args(tmp_path, prompt_files, dit_config_file, image, out, "--tiles", "3")) == 0
    assert np.load(out).shape == (45, 131)
    frames = write_frames(tmp_path / "frames", 2)
    assert main(base_args(tmp_path, prompt_files, dit_config_file, frames, tmp_path / "x.png")) == 2
    assert "give a folder name" in capsys.readouterr().err
    assert main(base_args(tmp_path, prompt_files, dit_config_file, image, tmp_path / "y.png", "--tiles", "many")) == 2
    assert "--tiles takes a number or 'auto'" in capsys.readouterr().err


def test_tiled_matting_maps_the_clicks_into_every_tile(tmp_path, prompt_files, dit_config_file, monkeypatch):
    """--tiles with --points: the global pass gets the clicks as given, each tile gets them in its own pixels."""
    from e2p_core import pipeline
    from e2p_core.tiling import plan_tiles

    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (45, 131, 3), dtype=np.uint8)).save(image)
    seen = []
    original = pipeline.perceive

    def recording(*args, points=None, **kwargs):
        seen.append((args[2].shape[:2], points.points_px.copy()))
        return original(*args, points=points, **kwargs)

    monkeypatch.setattr(pipeline, "perceive", recording)
    args = base_args(tmp_path, prompt_files, dit_config_file, image, tmp_path / "alpha.npy", "--tiles", "3",
                     "--points", "[[100, 20], [30, 40]]", "--points-space", "pixels")
    args[args.index("depth")] = "matting"
    args[args.index(str(prompt_files["depth"]))] = str(prompt_files["matting"])
    assert main(args) == 0
    clicks = np.array([[100.0, 20.0], [30.0, 40.0]])
    plan = plan_tiles((45, 131), 3)
    assert len(seen) == 1 + len(plan)
    assert seen[0][0] == (45, 131)
    np.testing.assert_array_equal(seen[0][1], clicks)
    for tile, (tile_hw, tile_clicks) in zip(plan, seen[1:]):
        assert tile_hw == (tile.height, tile.width)
        np.testing.assert_array_equal(tile_clicks, clicks - [tile.left, tile.top])
    alpha = np.load(tmp_path / "alpha.npy")
    assert alpha.shape == (45, 131) and 0 <= alpha.min() and alpha.max() <= 1


def test_a_folder_of_frames_refuses_a_point_prompt(tmp_path, prompt_files, dit_config_file, capsys):
    frames = write_frames(tmp_path / "frames", 2)
    args = base_args(tmp_path, prompt_files, dit_config_file, frames, tmp_path / "out", "--points", "[[1, 2]]")
    assert main(args) == 2
    assert "--points takes one image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
