"""ImageNet-style training of deformable-kernel networks (docs/TRAINING.md).

Layout, after flax's examples/imagenet:

    __main__.py        `python -m train`: runs main.py
    main.py            command line: config file + overrides -> train.train_and_evaluate
    config.py          the plain config object, file loading, `key=value` overrides
    configs/*.py       one `get_config()` per experiment (default.py lists every key)
    train.py           create_train_state, train_step, eval_step, check_config; setup_run,
                       the loop's periodic actions and train_and_evaluate, which runs them
    input_pipeline.py  the ImageNet-layout folder -> grain -> sharded device batches
    images.py          decoding and augmentation, run in grain's worker processes
    digits.py          generates the embedded `digits_deformed` dataset
    models.py          ResNet-50-DW, MobileNet-V2, a small ResNet; one swappable `conv`
    checkpoints.py     orbax checkpoints (atomic, keep last k) and exact resume
    report.py          progress bar, metrics JSONL, curves PNG, summary.json
    evaluate.py        `python -m train.evaluate --checkpoint RUN_DIR`
    visualize.py       `python -m train.visualize --checkpoint RUN_DIR`: ERFs and kernel
                       positions of a trained small ResNet, and the helpers behind them

Nothing in dk_jax imports this package.
"""
