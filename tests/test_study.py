"""Claims about the scale study (studies/): the digits_scaled generator's scale labels, the
controls of the ERF measurement (studies/erf_scale.py) on toy networks, the decision rule on
synthetic inputs, the study's config, and (slow) the runner end to end on a tiny dataset."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from studies import digits_scaled, erf_scale, scale
from train import models, visualize
from train.config import ConfigError

SQUARE = np.full((8, 8), 16.0)


def _side(img: np.ndarray, axis: int) -> int:
    """Pixels along `axis` at which the rendering reaches half its full intensity."""
    return int((img.max(axis=axis) >= 127.5).sum())


@pytest.mark.parametrize("scale", [0.55, 0.6, 0.8, 1.0, 1.25, 1.6, 1.75])
def test_rendered_box_is_16_s_pixels(scale):
    img = digits_scaled.render_digit(SQUARE, scale, (24.0, 24.0))
    for axis in (0, 1):
        assert abs(_side(img, axis) - 16 * scale) <= 1.0
    rows, cols = np.nonzero(img >= 127.5)
    assert abs(rows.mean() - 24.0) <= 0.5 and abs(cols.mean() - 24.0) <= 0.5


def test_generated_val_scales_match_their_labels(tmp_path):
    # All-ink squares through the generator's own deformations: rotation, shear and the
    # elastic field preserve area, so the side of the inked square is sqrt(area).
    rng = np.random.default_rng(0)
    source = (np.repeat(SQUARE[None], 10, 0), rng.permutation(10))
    root = digits_scaled.generate(tmp_path / "ds", train_copies=1, source=source)
    meta = json.loads((root / "dataset.json").read_text())
    assert sorted({v["scale"] for v in meta["val"].values()}) == list(digits_scaled.VAL_SCALES)
    from PIL import Image

    for name, entry in meta["val"].items():
        img = np.asarray(Image.open(root / "val" / name))
        side = np.sqrt((img >= 127.5).sum())
        assert abs(side - 16 * entry["scale"]) <= 1.0, (name, side)
    # Every val source is rendered once at each scale.
    sources = [v["source"] for v in meta["val"].values()]
    assert all(sources.count(s) == len(digits_scaled.VAL_SCALES) for s in set(sources))


def test_zoom_about_maps_points_about_the_centre():
    x = np.zeros((1, 9, 9), np.float32)
    x[0, 4, 4], x[0, 4, 8] = 200, 100
    out = np.asarray(erf_scale.zoom_about(x, np.array([2.0]), np.array([[4.0, 4.0]])))
    assert out[0, 4, 4] == 200  # the centre stays
    assert out[0, 4, 6] == 100  # p = 6 reads 4 + 2 * (6 - 4) = 8
    assert out[0, 4, 8] == 0


def _toy_run(conv: str, tmp_path) -> visualize.Run:
    """A small ResNet of the study's geometry with random kernels, every residual branch on
    (the zero-initialised norm scales set to one)."""
    config = scale.load_study_config(
        "scale_study", ["model.width=4", "model.stage_sizes=(1,1,1)", f"model.conv={conv}"]
    )
    model = models.create_model(config.model, 10)
    variables = model.init(jax.random.PRNGKey(1), np.zeros((1, 48, 48, 1), np.float32), train=False)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: np.ones_like(v) if getattr(path[-1], "key", "") == "scale" else v,
        variables,
    )
    return visualize.Run(tmp_path, config, model, variables, tuple("0123456789"))


def _r50(run, variables, factor_images):
    pix, scale, centre = factor_images
    block = erf_scale.stage_blocks(run)["last"]
    return erf_scale.measure(run, variables, pix, scale, centre, block)[1][:, 0].mean()


def _images(n=4):
    rng = np.random.default_rng(0)
    pix = rng.uniform(0, 255, (n, 48, 48)).astype(np.float32)
    return pix, np.ones(n), np.full((n, 2), 24.0)


def test_hand_set_offsets_dilate_a_dcn_erf(tmp_path):
    run = _toy_run("dcn", tmp_path)
    images = _images()
    r = {f: _r50(run, erf_scale.hand_set(run, run.variables, f), images) for f in (0.6, 1.0, 1.6)}
    assert r[0.6] < r[1.0] < r[1.6]
    assert r[1.6] > 1.15 * r[1.0]
    # factor 1 is the rigid layer: offsets zero, the learned (zero-initialised) model itself.
    assert np.isclose(r[1.0], _r50(run, run.variables, images), rtol=1e-5)


def test_hand_set_rotations_move_dk_taps_to_the_scope_border(tmp_path):
    # Scope kernels growing with the distance from the scope's centre: taps spread by the hand
    # set read larger weights away from the centre, so the ERF widens; contracted, it narrows.
    run = _toy_run("local_dk", tmp_path)
    grid = np.arange(4) - 1.5
    ring = 0.05 + (grid[:, None] ** 2 + grid[None, :] ** 2)

    def ringed(path, v):
        names = [getattr(k, "key", "") for k in path]
        if "inner_conv" in names and names[-1] == "kernel":
            return np.broadcast_to(ring[:, :, None], v.shape).astype(v.dtype)
        return v

    run.variables = jax.tree_util.tree_map_with_path(ringed, run.variables)
    images = _images()
    r = {f: _r50(run, erf_scale.hand_set(run, run.variables, f), images) for f in (0.6, 1.0, 1.5)}
    assert r[0.6] < r[1.0] < r[1.5]
    # At factor 1.5 the corner taps sit on the scope's corners: every corner tap is on the border.
    share = erf_scale.border_share(run, erf_scale.hand_set(run, run.variables, 1.5), images[0])
    assert share == pytest.approx(8 / 9)
    assert erf_scale.border_share(run, run.variables, images[0]) == pytest.approx(0.0)


def test_t_interval_is_the_student_interval():
    mean, low, high = erf_scale.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)  # t(0.975, 4) * s / sqrt(n)
    assert mean == 3.0
    assert low == pytest.approx(3.0 - half) and high == pytest.approx(3.0 + half)


def test_decision_rule_returns_each_verdict():
    d = erf_scale.decide
    assert d([0.30, 0.32, 0.28, 0.31, 0.29], 0.4, True)[0] == "supported"
    # Large and significant, but below half the ceiling: not supported.
    assert d([0.15, 0.16, 0.14, 0.15, 0.15], 0.4, True)[0] == "inconclusive"
    null = [0.01, -0.01, 0.0, 0.02, -0.02]
    assert d(null, 0.6, True)[0] == "contradicted"
    assert d(null, 0.6, False)[0] == "inconclusive"  # a positive control failed
    assert d(null, 0.05, True)[0] == "inconclusive"  # the ceiling is too low to tell
    assert d([0.1, 0.3, -0.1, 0.2, 0.0], 0.4, True)[0] == "inconclusive"
    assert d([0.3, 0.3], 0.4, True)[0] == "inconclusive"  # fewer than 3 pairs
    verdict, (mean, low, high) = d(null, 0.6, True)
    assert mean == pytest.approx(0.0) and low < 0 < high < 0.15


def test_the_study_config_carries_its_dataset_parameters():
    config = scale.load_study_config("scale_study", ["digits_scaled.limit=80"])
    assert config.data.generate == ""  # the runner writes the data, not train/
    assert config.digits_scaled.to_dict() == dict(seed=0, train_copies=8, size=48, limit=80)
    assert config.data.image_size == config.digits_scaled.size == 48
    with pytest.raises(ConfigError, match="study configs: scale_study"):
        scale.load_study_config("digits_deformed")


def test_a_pad_off_the_last_stage_grid_is_rejected(tmp_path, capsys):
    assert scale.main(["--explore-pad", "12", "--workdir", str(tmp_path)]) == 2
    assert "--explore-pad must be 0 or a positive multiple of 8" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was trained


def test_render_at_scale_keeps_the_centre():
    img = np.zeros((1, 9, 9), np.uint8)
    img[0, 4, 4] = 200
    img[0, 4, 6] = 100
    out = visualize.render_at_scale(img, 2.0)
    assert out[0, 4, 4] == 200  # the centre is fixed
    assert out[0, 4, 8] == 100  # a point 2 px right of the centre moves to 4 px
    np.testing.assert_array_equal(visualize.render_at_scale(img, 1.0), img)


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    root = tmp_path / "data"  # written by the runner with the `digits_scaled` overrides
    args = [
        f"--set=data.root={root}",
        "--set=digits_scaled.train_copies=1",
        "--set=digits_scaled.limit=80",
        "--set=data.workers=0",
        "--set=model.width=4",
        "--set=model.stage_sizes=(1,1,1)",
        "--set=optim.batch_size=8",
        "--set=optim.num_steps=2",
        "--set=run.eval_every_steps=2",
        "--set=run.checkpoint_every_steps=2",
        "--set=run.log_every_steps=1",
        "--arms",
        "frozen",
        "local_dk",
        "--seeds",
        "0",
        "--erf-sources",
        "4",
        "--explore-pad",
        "8",
        "--workdir",
        str(tmp_path / "runs"),
        "--docs",
        str(tmp_path),
    ]
    assert scale.main(args) == 0
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["name"] == "digits_scaled"
    assert meta["params"]["train_copies"] == 1 and meta["params"]["limit"] == 80
    assert meta["images"]["val"] == 16 * len(digits_scaled.VAL_SCALES)  # 20% of 80 sources
    results = (tmp_path / "RESULTS.md").read_text()
    assert "## Decision rule" in results and "**inconclusive**" in results  # one seed
    run = json.loads((tmp_path / "runs" / "local_dk_s0" / "scale_study.json").read_text())
    assert len(run["top1"]) == len(digits_scaled.VAL_SCALES)
    assert {"learned", "zoom_back", "hand_set_+1", "hand_set_-1"} <= set(run["stages"]["last"])
    frozen = json.loads((tmp_path / "runs" / "frozen_s0" / "scale_study.json").read_text())
    assert frozen["params"] == run["params"]
    padded = json.loads((tmp_path / "runs" / "local_dk_s0" / "scale_study_pad8.json").read_text())
    assert padded["stages"]["last"]["unit_centre"] == [32.0, 32.0]  # the val centre, moved by 8
    assert "## Exploratory, not pre-registered" in results
    for name in ("erf_vs_scale", "mean_erf", "erf_digits"):
        assert (tmp_path / "study" / f"{name}.png").stat().st_size > 1000
    # Notes survive a rewrite; finished runs are not trained again.
    summary = tmp_path / "runs" / "frozen_s0" / "summary.json"
    trained_at = summary.stat().st_mtime_ns
    (tmp_path / "RESULTS.md").write_text(results.replace("(none yet)", "A hand-written remark."))
    assert scale.main(args) == 0
    assert "A hand-written remark." in (tmp_path / "RESULTS.md").read_text()
    assert summary.stat().st_mtime_ns == trained_at


def test_offset_clip_reaches_the_dcn_layers(tmp_path):
    run = _toy_run("dcn", tmp_path)
    config = scale.load_study_config(
        "scale_study", ["model.width=4", "model.stage_sizes=(1,1,1)", "model.conv=dcn"]
    )
    assert config.model.offset_clip == (-2.0, 2.0)
    far = erf_scale.hand_set(run, run.variables, 9.0)  # asks for offsets of 8 px at the corners
    _, state = run.model.apply(
        far, np.zeros((1, 48, 48, 1), np.float32), train=False, mutable=["intermediates"]
    )
    offsets = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"])
        if any(getattr(k, "key", None) == "offset" for k in path)
    ]
    assert len(offsets) == 3  # the adaptive stages' blocks
    for o in offsets:
        assert o.max() == 2.0 and o.min() == -2.0
