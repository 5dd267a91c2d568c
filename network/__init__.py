"""Network registry: maps every accepted `--network` spelling to its module."""
from __future__ import annotations

from types import ModuleType

from torch import nn

from network import rrm, rrm_attention

# The released spellings come first; the short names are aliases.
NETWORKS: dict[str, ModuleType] = {
    "network.RRM": rrm,
    "network.RRM(attention)": rrm_attention,
    "rrm": rrm,
    "rrm_attention": rrm_attention,
}


def resolve_network(name: str) -> ModuleType:
    """The module (with `Net` and `SegNet`) registered under `name`."""
    try:
        return NETWORKS[name]
    except KeyError:
        valid = ", ".join(repr(key) for key in NETWORKS)
        raise ValueError(f"unknown network {name!r}; valid names: {valid}") from None


def build_segnet(name: str, width: float = 1.0, num_classes: int = rrm.VOC_NUM_CLASSES) -> nn.Module:
    """A fresh `SegNet` of the network registered under `name`, for `num_classes` classes (VOC's 20)."""
    return resolve_network(name).SegNet(width=width, num_classes=num_classes)
