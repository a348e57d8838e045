"""Claims about the study runner (train/study.py) and the figures (train/visualize.py): with a
tiny budget on a tiny folder, one invocation trains every (conv, seed), runs the scale test and
writes RESULTS.md with its table and PNGs; a second invocation trains nothing and keeps the
hand-written notes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_train import make_folder
from train import study, visualize

TINY = [
    "data.generate=''",
    "data.image_size=16",
    "data.eval_resize=16",
    "data.crop_area=(0.8,1.0)",
    "data.workers=0",
    "model.width=8",
    "model.stage_sizes=(1,1,1)",
    "optim.batch_size=8",
    "optim.num_steps=2",
    "run.eval_every_steps=2",
    "run.checkpoint_every_steps=2",
    "run.log_every_steps=1",
]


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    data = make_folder(tmp_path / "data", classes=3, train=8, val=4, size=16)
    args = [f"--set={o}" for o in [*TINY, f"data.root={data}"]]
    args += ["--convs", "depthwise", "local_dk", "--seeds", "0", "--scales", "0.8", "1.0", "1.2"]
    args += ["--erf-images", "4", "--workdir", str(tmp_path / "runs"), "--docs", str(tmp_path)]
    assert study.main(args) == 0
    results = (tmp_path / "RESULTS.md").read_text()
    for conv in ("depthwise", "local_dk"):
        assert f"| `{conv}` |" in results
        run = json.loads((tmp_path / "runs" / f"{conv}_s0" / "scale_test.json").read_text())
        assert len(run["top1"]) == 3 and len(run["r50"][0]) == 4
    for name in ("accuracy_vs_step_time", "scale_test", "mean_erf", "erf_local_dk"):
        assert (tmp_path / "study" / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "study" / "kernel_positions_local_dk.png").is_file()

    # Notes survive a rewrite; finished runs are not trained again, and the wall times
    # reported are those of the invocation that trained them.
    summary = tmp_path / "runs" / "depthwise_s0" / "summary.json"
    trained_at = summary.stat().st_mtime_ns
    (tmp_path / "RESULTS.md").write_text(results.replace("(none yet)", "A hand-written remark."))
    assert study.main(args) == 0
    again = (tmp_path / "RESULTS.md").read_text()
    assert "A hand-written remark." in again
    assert summary.stat().st_mtime_ns == trained_at
    timing = json.loads((tmp_path / "runs" / "study_timing.json").read_text())
    assert set(timing["runs"]) == {"depthwise_s0", "local_dk_s0"}
    assert f"depthwise_s0 {timing['runs']['depthwise_s0']:.0f} s" in again


def test_render_at_scale_keeps_the_centre():
    img = np.zeros((1, 9, 9), np.uint8)
    img[0, 4, 4] = 200
    img[0, 4, 6] = 100
    out = visualize.render_at_scale(img, 2.0)
    assert out[0, 4, 4] == 200  # the centre is fixed
    assert out[0, 4, 8] == 100  # a point 2 px right of the centre moves to 4 px
    np.testing.assert_array_equal(visualize.render_at_scale(img, 1.0), img)
