"""Research studies built on the training program in train/ (results in docs/RESULTS.md).

The scale study: does a deformable kernel's effective receptive field follow the object's
scale? `make study`, `python -m studies.scale`.

    scale.py             the runner: writes the data, trains every (arm, seed) with
                         `train.train.train_and_evaluate`, analyses the runs, applies the
                         pre-registered decision rule, writes docs/RESULTS.md
    configs/*.py         one `get_config()` per study (scale_study.py: the arms, seeds, budget
                         and the `digits_scaled` group)
    digits_scaled.py     the study's dataset: digits rendered at known scales on a 48x48 canvas
    erf_scale.py         the measurements: ERF radii of the unit at the object's centre, their
                         exponent against the scale, the zoom-back and hand-set controls, offset
                         saturation, the t-interval and the decision rule
    scale_figures.py     the study's figures in docs/study/

Nothing in dk_jax or train imports this package.
"""
