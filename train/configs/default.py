"""Every config key, with the defaults other configs start from (ImageNet-like values).

Groups: `data` (the folder and the input pipeline), `model`, `optim`, `run` (the loop:
logging, evaluation, checkpoints). A config may change values; it cannot add keys.
"""

from train.config import Config


def get_config() -> Config:
    return Config(
        name="default",
        # Run directory: checkpoints/, metrics.jsonl, config.json, curves.png, summary.json.
        workdir="runs/default",
        seed=0,
        data=Config(
            # root/{train,val}/<class>/<image>.{jpg,jpeg,png}
            root="data/imagenet",
            # "digits_deformed": if `root` does not exist, first write the embedded dataset there
            # (train/digits.py with its defaults). "": use `root` as it is.
            generate="",
            # Train crop side after random-resized-crop; eval: resize shorter side, centre crop.
            image_size=224,
            eval_resize=256,
            crop_area=(0.08, 1.0),
            crop_ratio=(3 / 4, 4 / 3),
            flip=True,
            channels=3,
            # Per-channel mean and std on the 0..255 scale.
            mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
            std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
            # A flat val/ folder: its labels file, the ILSVRC2012 validation ground truth (with the
            # devkit's meta.mat next to it) or a `name,label` CSV. "": val/<class>/<image>.
            val_labels="",
            # grain decoding worker processes (0: decode in the main process) and about how many
            # batches they decode ahead of the step.
            workers=4,
            prefetch=4,
            # JPEGs decoded at 1/2, 1/4 or 1/8 size when the crop keeps image_size pixels.
            reduced_decode=True,
            # A corrupt or unreadable image: "fatal" stops the run, "skip" drops it with a warning.
            on_corrupt="fatal",
        ),
        model=Config(
            arch="resnet50dw",  # resnet50dw | mobilenetv2 | small_resnet
            # depthwise | dcn | global_dk | local_dk | dk_dcn | condconv
            conv="depthwise",
            # Indices of the stages whose 3x3 depthwise convs use `conv` (others stay rigid):
            # resnet50dw / small_resnet: bottleneck stages; mobilenetv2: inverted-residual groups.
            adaptive_stages=(2, 3),
            scope_size=4,
            rotation_groups=1,
            # "scope", None, or a (min, max) pair (local_dk, dk_dcn).
            rotation_clip="scope",
            # dcn, dk_dcn: None or a (min, max) pair for the image offsets (pixels, before the
            # dilation factor).
            offset_clip=None,
            num_experts=4,  # condconv
            width=64,  # small_resnet: first stage width; mobilenetv2: ignored
            width_multiplier=1.0,  # mobilenetv2
            stage_sizes=(1, 1, 1),  # small_resnet
            stem_stride=1,  # small_resnet: stride of its 3x3 stem conv
            num_classes=0,  # 0: the number of class folders
            dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
            # dk_jax implementation: None (ffi where built), "ffi" or "xla".
            implementation=None,
        ),
        optim=Config(
            batch_size=256,  # global, over all devices and hosts
            num_epochs=90.0,
            num_steps=0,  # > 0 overrides num_epochs
            # Peak (after the warmup) for 256 images: the run uses learning_rate * batch_size / 256.
            learning_rate=0.1,
            warmup_epochs=5.0,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-5,  # on kernels only, not on biases or norm scales
            label_smoothing=0.1,
            # Parameters kept at their initial values: a parameter whose path (module names and
            # the parameter's name) contains one of these names gets no update. ("rotation_conv",)
            # keeps a local DK layer's rotation at zero: a rigid layer with DK's parameters.
            freeze=(),
        ),
        run=Config(
            log_every_steps=50,
            eval_every_steps=0,  # 0: once per epoch
            checkpoint_every_steps=1000,
            keep_checkpoints=3,
            progress=True,
            tensorboard=False,  # needs tensorboardX
        ),
    )
