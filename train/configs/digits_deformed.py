"""The embedded demo: a small ResNet with local deformable kernels on `digits_deformed`
(generated on first use from scikit-learn's bundled digits; see train/digits.py).

    python -m train --config digits_deformed
"""

from train.configs import default


def get_config():
    config = default.get_config()
    config.name = "digits_deformed"
    config.workdir = "runs/digits_deformed"
    data = config.data
    data.root = "data/digits_deformed"
    data.generate = "digits_deformed"
    data.image_size = 32
    data.eval_resize = 32
    data.crop_area = (0.8, 1.0)
    data.crop_ratio = (0.85, 1.18)
    data.flip = False  # digits are not mirror-symmetric
    data.channels = 1
    data.mean = (40.0,)
    data.std = (70.0,)
    data.workers = 2
    model = config.model
    model.arch = "small_resnet"
    model.conv = "local_dk"
    model.adaptive_stages = (0, 1, 2)
    model.width = 16
    model.stage_sizes = (1, 2, 2)
    model.stem_stride = 2  # 8x8 scans upsampled to 32x32: 16x16 features lose nothing
    optim = config.optim
    optim.batch_size = 128
    optim.num_epochs = 8.0
    optim.learning_rate = 0.4  # per 256 images: 0.2 at batch 128
    optim.warmup_epochs = 1.0
    optim.weight_decay = 5e-5
    config.run.log_every_steps = 10
    config.run.checkpoint_every_steps = 100
    return config
