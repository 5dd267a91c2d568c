"""RRM network (SPEC §3): ResNet-38 with a classification/CAM head and a segmentation head."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from network import resnet38d
from network.fast_conv import FastConv2d
from voc12.lists import NUM_CLASSES as VOC_NUM_CLASSES

CAM_SCALES = (0.5, 1.5, 2.0)
# What a forward returns depends on its mode flags (see each docstring).
NetOutput = torch.Tensor | tuple[torch.Tensor, ...]
SegNetOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]


def full_precision(tensor: torch.Tensor) -> torch.autocast:
    """Autocast switched off on the tensor's device: what runs inside stays float32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def multiscale_cam(cam_at: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   cam1: torch.Tensor) -> torch.Tensor:
    """Mean of `cam1` and the CAMs of `x` resized by CAM_SCALES (computed without grad), in float32
    also under autocast: mining's 0.1 / 0.8 / quantile thresholds must see float32 values."""
    height, width = x.shape[2], x.shape[3]
    cams = [cam1.float()]
    with torch.no_grad():
        for scale in CAM_SCALES:
            scaled = F.interpolate(x, size=(int(height * scale), int(width * scale)),
                                   mode="bilinear", align_corners=False)
            cam = cam_at(scaled)
            with full_precision(cam):
                cams.append(F.interpolate(cam.float(), size=cam1.shape[2:], mode="bilinear", align_corners=False))
    with full_precision(cam1):
        return sum(cams) / len(cams)


class Net(resnet38d.Net):
    """Backbone + fc8 (classifier, CAM weights) + dilated two-layer segmentation head.

    `num_classes` (the data set's; released: VOC's 20) sizes fc8 and the CAMs; the segmentation head
    has one more output, the background."""

    variant = "rrm"
    freeze_conv1a = False
    from_scratch_names: tuple[str, ...] = ("fc8", "fc8_seg_conv1", "fc8_seg_conv2")

    def __init__(self, width: float = 1.0, num_classes: int = VOC_NUM_CLASSES) -> None:
        super().__init__(width)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        seg_channels = resnet38d.scale_channels(512, width)
        self.dropout7 = nn.Dropout2d(0.5)
        self.fc8 = nn.Conv2d(self.out_channels, num_classes, 1, bias=False)
        self.fc8_seg_conv1 = FastConv2d(self.out_channels, seg_channels, 3, padding=12, dilation=12, bias=True)
        self.fc8_seg_conv2 = FastConv2d(seg_channels, num_classes + 1, 3, padding=12, dilation=12, bias=True)
        for layer in (self.fc8, self.fc8_seg_conv1, self.fc8_seg_conv2):
            nn.init.xavier_uniform_(layer.weight)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Image-level logits (B,num_classes): fc8 on the globally pooled, dropped-out features."""
        pooled = F.adaptive_avg_pool2d(self.dropout7(features), 1)
        return self.fc8(pooled).flatten(1)

    def cam(self, features: torch.Tensor) -> torch.Tensor:
        """Class activation maps (B,num_classes,h,w) from the features without dropout; float32 also under
        autocast (they feed mining)."""
        with full_precision(features):
            return F.relu(F.conv2d(features.float(), self.fc8.weight.float()))

    def forward(self, x: torch.Tensor, require_seg: bool = True, require_mcam: bool = True) -> NetOutput:
        """(logits, cam, seg) when both flags are set; cam only; seg only; else logits."""
        features = super().forward(x)
        if require_seg and require_mcam:
            return self.classify(features), self.cam(features), self.segment(features)
        if require_mcam:
            return self.cam(features)
        if require_seg:
            return self.segment(features)
        return self.classify(features)

    def segment(self, features: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B,num_classes+1,h,w)."""
        return self.fc8_seg_conv2(F.relu(self.fc8_seg_conv1(features)))

    def get_parameter_groups(self) -> tuple[list, list, list, list]:
        """(pretrained weights, pretrained biases, from-scratch weights, from-scratch biases); trainable
        BatchNorm parameters (`set_batchnorm_training`) join the pretrained biases (no weight decay)."""
        scratch = {id(getattr(self, name)) for name in self.from_scratch_names}
        groups: tuple[list, list, list, list] = ([], [], [], [])
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                groups[1].extend(p for p in (module.weight, module.bias) if p.requires_grad)
            if not isinstance(module, nn.Conv2d):
                continue
            offset = 2 if id(module) in scratch else 0
            if module.weight.requires_grad:
                groups[offset].append(module.weight)
            if module.bias is not None and module.bias.requires_grad:
                groups[offset + 1].append(module.bias)
        return groups


class SegNet(Net):
    """The model the scripts train: adds 4-scale CAM averaging to the training forward."""

    def forward(self, x: torch.Tensor, require_seg: bool = True, require_mcam: bool = True) -> SegNetOutput:
        """Training: (logits, 4-scale cam, [seg]); seg only: seg (inference); neither: logits."""
        if require_seg and require_mcam:
            logits, cam1, seg1 = super().forward(x, require_seg=True, require_mcam=True)
            cam = multiscale_cam(
                lambda scaled: Net.forward(self, scaled, require_seg=False, require_mcam=True), x, cam1)
            return logits, cam, [seg1]
        return super().forward(x, require_seg=require_seg, require_mcam=require_mcam)

    def predict_seg(self, x: torch.Tensor) -> torch.Tensor:
        """Single-scale segmentation logits (B,num_classes+1,h,w)."""
        return self.forward(x, require_seg=True, require_mcam=False)
