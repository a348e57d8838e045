"""ResNet-50-DW on ImageNet (the paper's base model), 90 epochs, batch 256.

Deformable kernels in the last two stages (res4, res5): `--set model.conv=local_dk`.
"""

from train.configs import default


def get_config():
    config = default.get_config()
    config.name = "imagenet_resnet50dw"
    config.workdir = "runs/imagenet_resnet50dw"
    config.model.arch = "resnet50dw"
    config.model.adaptive_stages = (2, 3)
    return config
