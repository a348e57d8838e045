"""MobileNet-V2 on ImageNet.

Adaptive layers: the depthwise convs of the stride-16 and stride-32 groups (64, 96, 160 and
320 channels); `--set model.conv=local_dk`.
"""

from train.configs import default


def get_config():
    config = default.get_config()
    config.name = "imagenet_mobilenetv2"
    config.workdir = "runs/imagenet_mobilenetv2"
    config.model.arch = "mobilenetv2"
    config.model.adaptive_stages = (3, 4, 5, 6)
    config.optim.learning_rate = 0.05
    config.optim.weight_decay = 4e-5
    config.optim.num_epochs = 150.0
    return config
