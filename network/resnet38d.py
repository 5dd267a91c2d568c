"""ResNet-38 (model A1 of Wu et al., "Wider or Deeper"), output stride 8 (SPEC §2).

Parameter names match the released checkpoints exactly. `width` scales every channel
count (1.0 = the released architecture) so that the same code runs CPU-sized experiments.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from network.fast_conv import FastConv2d


def scale_channels(channels: int, width: float, multiple: int = 1) -> int:
    """`channels * width` rounded to a positive multiple of `multiple` (exact at width 1.0)."""
    return multiple * max(1, round(channels * width / multiple))


def check_width(width: float) -> float:
    """Return `width` as a float, rejecting values that cannot scale a network."""
    if not width > 0:
        raise ValueError(f"width must be a positive channel multiplier, got {width!r}")
    return float(width)


def add_residual(residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """residual + shortcut, in place when no graph is recorded (a fast conv's output may be a view,
    which autograd forbids modifying in place)."""
    return residual.add_(shortcut) if not torch.is_grad_enabled() else residual + shortcut


class ResBlock(nn.Module):
    """Pre-activation basic block: two 3x3 convs, projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1) -> None:
        super().__init__()
        if first_dilation is None:
            first_dilation = dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = FastConv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = FastConv2d(mid_channels, out_channels, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_tap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block output and the bn-relu of its input (the feature tap)."""
        # In-place ReLUs: the BN backward needs its input only, and the copies cost time.
        activated = F.relu(self.bn_branch2a(x), inplace=True)
        # The identity shortcut is x itself; the projection sees the activated input.
        shortcut = x if self.same_shape else self.conv_branch1(activated)
        residual = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(activated)), inplace=True))
        return add_residual(residual, shortcut), activated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tap(x)[0]


class ResBlock_bot(nn.Module):
    """Pre-activation bottleneck block (1x1, 3x3, 1x1) with dropout, projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"bottleneck output channels must be divisible by 4, got {out_channels}")
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = FastConv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_tap(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block output and the bn-relu of its input (the feature tap)."""
        activated = F.relu(self.bn_branch2a(x), inplace=True)
        shortcut = self.conv_branch1(activated)
        y = self.conv_branch2a(activated)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y), inplace=True)))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y), inplace=True)))
        return add_residual(y, shortcut), activated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tap(x)[0]


class Net(nn.Module):
    """ResNet-38 backbone; `forward` gives conv6 (4096*width channels at 1/8 resolution).

    Every BatchNorm uses its running statistics and has frozen affine parameters, also after
    `.train()` (unless `set_batchnorm_training(True)`). conv1a is frozen too unless a subclass sets
    `freeze_conv1a = False`.
    """

    freeze_conv1a: bool = True

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.width = check_width(width)
        self.batchnorm_frozen = True
        c64, c128, c256, c512, c1024 = (scale_channels(c, width) for c in (64, 128, 256, 512, 1024))
        c2048 = scale_channels(2048, width, multiple=4)
        self.out_channels = scale_channels(4096, width, multiple=4)

        self.conv1a = FastConv2d(3, c64, 3, padding=1, bias=False)

        self.b2 = ResBlock(c64, c128, c128, stride=2)
        self.b2_1 = ResBlock(c128, c128, c128)
        self.b2_2 = ResBlock(c128, c128, c128)

        self.b3 = ResBlock(c128, c256, c256, stride=2)
        self.b3_1 = ResBlock(c256, c256, c256)
        self.b3_2 = ResBlock(c256, c256, c256)

        self.b4 = ResBlock(c256, c512, c512, stride=2)
        self.b4_1 = ResBlock(c512, c512, c512)
        self.b4_2 = ResBlock(c512, c512, c512)
        self.b4_3 = ResBlock(c512, c512, c512)
        self.b4_4 = ResBlock(c512, c512, c512)
        self.b4_5 = ResBlock(c512, c512, c512)

        self.b5 = ResBlock(c512, c512, c1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(c1024, c512, c1024, dilation=2)
        self.b5_2 = ResBlock(c1024, c512, c1024, dilation=2)

        self.b6 = ResBlock_bot(c1024, c2048, stride=1, dilation=4, dropout=0.3)
        self.b7 = ResBlock_bot(c2048, self.out_channels, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(self.out_channels)
        self._freeze()

    def _freeze(self) -> None:
        if self.freeze_conv1a:
            self.conv1a.weight.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.requires_grad_(not self.batchnorm_frozen)
                module.bias.requires_grad_(not self.batchnorm_frozen)
                if self.batchnorm_frozen:
                    module.eval()

    def set_batchnorm_training(self, enabled: bool) -> None:
        """enabled: the BatchNorms normalise with batch statistics in train mode (updating their
        running ones) and learn their affine parameters, for training from random weights (not
        released: the released networks keep them frozen, the default)."""
        self.batchnorm_frozen = not enabled
        self.train(self.training)

    def train(self, mode: bool = True) -> "Net":
        super().train(mode)
        self._freeze()
        return self

    def forward_as_dict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """conv4 (bn-relu input of b5), conv5 (bn-relu input of b6) and conv6 (final features)."""
        x = self.conv1a(x)
        for block in (self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2,
                      self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5):
            x = block(x)
        x, conv4 = self.b5.forward_with_tap(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_with_tap(x)
        conv6 = F.relu(self.bn7(self.b7(x)), inplace=True)
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_as_dict(x)["conv6"]
