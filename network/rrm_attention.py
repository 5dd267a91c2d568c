"""RRM with the attention branch (SPEC §4): a second segmentation head over a global
attention unit (GAU), averaged with the RRM head; also returns the features for BCD loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from network import resnet38d, rrm
from network.fast_conv import FastConv2d


class Net(rrm.Net):
    """RRM Net plus GAU_w1..3 and fc8_seg_conv3/4 (default PyTorch init for those)."""

    variant = "rrm_attention"
    from_scratch_names = ("fc8",)

    def __init__(self, width: float = 1.0, num_classes: int = rrm.VOC_NUM_CLASSES) -> None:
        super().__init__(width, num_classes)
        gau_channels = resnet38d.scale_channels(256, width)
        self.GAU_w1 = nn.Conv2d(self.out_channels, gau_channels, 1, bias=False)
        self.GAU_w2 = nn.Conv2d(self.out_channels, gau_channels, 1, bias=False)
        self.GAU_w3 = nn.Conv2d(self.out_channels, gau_channels, 1, bias=False)
        self.fc8_seg_conv3 = FastConv2d(2 * gau_channels, gau_channels, 3, padding=1, bias=False)
        self.fc8_seg_conv4 = FastConv2d(gau_channels, num_classes + 1, 3, padding=1, bias=False)

    def segment_with_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Averaged segmentation logits (B,num_classes+1,h,w) and seg_feature = concat(old, new)."""
        batch, _, height, width = features.shape
        query = self.GAU_w1(features).flatten(2).transpose(1, 2)
        key = self.GAU_w2(features).flatten(2)
        value = self.GAU_w3(features)
        # float32 also under autocast: fp16 query·key products overflow to inf, then softmax gives NaN.
        with rrm.full_precision(features):
            # The released code normalises over dim 1 (the query axis), not the usual last axis.
            attention = F.softmax(torch.bmm(query.float(), key.float()), dim=1)
            attended = torch.bmm(value.flatten(2).float(), attention).view(batch, -1, height, width)
        value = value.to(attended.dtype)
        new_feature = torch.cat([attended, value], dim=1)
        seg2 = self.fc8_seg_conv4(F.relu(self.fc8_seg_conv3(new_feature)))
        old_feature = F.relu(self.fc8_seg_conv1(features))
        seg1 = self.fc8_seg_conv2(old_feature)
        return (seg1 + seg2) / 2, torch.cat([old_feature, new_feature], dim=1)

    def forward(self, x: torch.Tensor, require_cam: bool = True, require_seg: bool = True) -> rrm.NetOutput:
        """(logits, cam, seg, seg_feature) when both flags are set; cam only; seg only; else logits."""
        features = resnet38d.Net.forward(self, x)
        if require_cam and require_seg:
            seg, seg_feature = self.segment_with_features(features)
            return self.classify(features), self.cam(features), seg, seg_feature
        if require_cam:
            return self.cam(features)
        if require_seg:
            return self.segment_with_features(features)[0]
        return self.classify(features)

    def predict_seg(self, x: torch.Tensor) -> torch.Tensor:
        """Single-scale segmentation logits (B,num_classes+1,h,w) (element 2 of the full forward)."""
        return Net.forward(self, x, require_cam=False, require_seg=True)


class SegNet(Net):
    """Training model: the full forward with the CAM averaged over 4 scales."""

    def forward(self, x: torch.Tensor, require_seg: bool = True, require_mcam: bool = True) -> rrm.NetOutput:
        """Training: (logits, 4-scale cam, seg, seg_feature); seg only: seg; cam only: cam;
        neither: logits."""
        if require_seg and require_mcam:
            logits, cam1, seg, seg_feature = super().forward(x, require_cam=True, require_seg=True)
            cam = rrm.multiscale_cam(
                lambda scaled: Net.forward(self, scaled, require_cam=True, require_seg=False), x, cam1)
            return logits, cam, seg, seg_feature
        return super().forward(x, require_cam=require_mcam, require_seg=require_seg)

