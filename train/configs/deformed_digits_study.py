"""The deformed-digits study (`make study`, `python -m train.study`): the small ResNet of
`digits_deformed`, trained with every `model.conv` choice at one budget, 3 seeds each.

The budget is fixed in steps (not wall time) so every variant sees the same images in the same
order for a given seed: 400 steps of 32 images (about 2.2 epochs), sized so that all 18 runs
plus the scale test finish in under an hour on a 2-core CPU. The batch is small on purpose:
`global_dk` and `condconv` convolve every sample with its own kernel, and XLA on CPU computes
the gradient of that batched grouped convolution in time quadratic in the batch (about 10 s a
step at batch 128 against 0.4 s at 32), so batch 128 would not fit the hour.

The runner sets `model.conv`, `seed` and `workdir` per run; everything else comes from here.
"""

from train.configs import digits_deformed

# What the runner sweeps; `--set` cannot reach these, use the runner's flags instead.
CONVS = ("depthwise", "global_dk", "local_dk", "dcn", "dk_dcn", "condconv")
SEEDS = (0, 1, 2)
# Object scales of the scale test (val digits zoomed about the image centre).
SCALES = (0.6, 0.8, 1.0, 1.2, 1.4)


def get_config():
    config = digits_deformed.get_config()
    config.name = "deformed_digits_study"
    config.workdir = "runs/study"
    optim = config.optim
    optim.batch_size = 32
    optim.num_steps = 400
    optim.learning_rate = 0.8  # per 256 images: 0.1 at batch 32
    optim.warmup_epochs = 0.3
    run = config.run
    run.log_every_steps = 25
    run.eval_every_steps = 400  # once, at the end
    run.checkpoint_every_steps = 400
    run.keep_checkpoints = 1
    run.progress = False
    return config
