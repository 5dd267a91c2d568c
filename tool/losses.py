"""Training losses of RRM (SPEC §8): classification, split cross-entropy, BCD, and their sum."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voc12.lists import IGNORE_LABEL

COS_EPS = 1e-7
COUNT_EPS = 1e-7
NO_BG_PIXEL_TERM = 2.0    # background pixel term of an image without background pixels
NO_BG_CENTRE_TERM = 1.0   # bg-centre part of the centre term when the batch has no bg pixel


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multilabel soft-margin loss of the (B,C) class logits against the multi-hot labels."""
    logits = logits.reshape(logits.shape[0], -1)
    if logits.shape != labels.shape:
        raise ValueError(f"classification_loss: logits {tuple(logits.shape)} and labels "
                         f"{tuple(labels.shape)} must have the same (B, C) shape")
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def _mean_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE averaged over non-ignored pixels; exactly 0 (with a graph) when there is none."""
    summed = F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL, reduction="sum")
    valid = (target != IGNORE_LABEL).sum()
    return summed / valid.clamp(min=1)


def split_cross_entropy(seg_logits_upsampled: Tensor, pseudo_label: Tensor) -> Tensor:
    """CE(pred, background-only label) + CE(pred, foreground-only label), SPEC §8."""
    if pseudo_label.dim() != 3 or seg_logits_upsampled.dim() != 4 \
            or pseudo_label.shape != seg_logits_upsampled.shape[:1] + seg_logits_upsampled.shape[2:]:
        raise ValueError(f"split_cross_entropy: expected logits (B,C,H,W) and pseudo_label (B,H,W) of "
                         f"the same B,H,W; got {tuple(seg_logits_upsampled.shape)} and "
                         f"{tuple(pseudo_label.shape)}")
    pseudo_label = pseudo_label.long()
    ignore = torch.full_like(pseudo_label, IGNORE_LABEL)
    background_label = torch.where(pseudo_label == 0, pseudo_label, ignore)
    foreground_label = torch.where(pseudo_label == 0, ignore, pseudo_label)
    return (_mean_cross_entropy(seg_logits_upsampled, background_label)
            + _mean_cross_entropy(seg_logits_upsampled, foreground_label))


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosine (N,M) between rows of a (N,C) and b (M,C), with the released +1e-7 guard."""
    return (a @ b.t()) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :] + COS_EPS)


def bcd_loss(seg: Tensor, seg_feature: Tensor) -> Tensor:
    """Background/class-centre discrimination loss of the attention variant, SPEC §8; its class loop
    runs over seg's C+1 channels (VOC 21, COCO 81)."""
    if seg.dim() != 4 or seg_feature.dim() != 4 or seg.shape[0] != seg_feature.shape[0] \
            or seg.shape[2:] != seg_feature.shape[2:]:
        raise ValueError(f"bcd_loss: seg (B,C+1,h,w) and seg_feature (B,C,h,w) must share B,h,w; got "
                         f"{tuple(seg.shape)} and {tuple(seg_feature.shape)}")
    batch, num_labels = seg.shape[:2]
    pixel_class = seg.detach().argmax(dim=1).flatten(1)                      # (B,N)
    membership = F.one_hot(pixel_class, num_labels).to(seg_feature.dtype)   # (B,N,C+1)
    features = seg_feature.flatten(2).transpose(1, 2)                        # (B,N,C)
    feature_norm = features.norm(dim=2)                                      # (B,N)

    bg_member = membership[..., 0]                                           # (B,N)
    bg_count = bg_member.sum(dim=1)                                          # (B,)
    bg_centre = (features * bg_member[..., None]).sum(dim=1) / (bg_count[:, None] + COUNT_EPS)
    bg_cos = (features * bg_centre[:, None]).sum(dim=2) / (
        feature_norm * bg_centre.norm(dim=1)[:, None] + COS_EPS)
    bg_terms = ((1 - bg_cos) * bg_member).sum(dim=1) / (bg_count + COUNT_EPS)
    bg_terms = torch.where(bg_count > 0, bg_terms, torch.full_like(bg_terms, NO_BG_PIXEL_TERM))

    fg_member = membership[..., 1:]                                          # (B,N,C)
    fg_count = fg_member.sum(dim=(0, 1))                                     # (C,)
    fg_centre = torch.einsum("bnk,bnc->kc", fg_member, features) / (fg_count[:, None] + COUNT_EPS)
    fg_cos = torch.einsum("bnc,kc->bnk", features, fg_centre) / (
        feature_norm[..., None] * fg_centre.norm(dim=1) + COS_EPS)
    fg_terms = ((1 - fg_cos) * fg_member).sum(dim=(0, 1)) / (fg_count + COUNT_EPS)

    # Means over the present classes as masked sums over all C, so nothing waits on the device.
    present = (fg_count > 0).to(features.dtype)                              # (C,)
    num_fg = present.sum()
    pixel_term = (bg_terms.sum() + (fg_terms * present).sum()) / (num_fg + batch)
    pairs = present[:, None] * present[None, :] * (1 - torch.eye(num_labels - 1, dtype=features.dtype,
                                                                 device=features.device))
    fg_fg = ((1 + _cosine(fg_centre, fg_centre)) * pairs).sum() / pairs.sum().clamp(min=1)
    fg_bg = ((1 + _cosine(fg_centre, bg_centre)) * present[:, None]).sum() / (num_fg * batch).clamp(min=1)
    has_bg_pixel = bg_count.sum() > 0
    centre_term = 0.5 * fg_fg + torch.where(has_bg_pixel, 0.5 * fg_bg, fg_bg.new_tensor(NO_BG_CENTRE_TERM))
    return pixel_term + torch.where(num_fg > 0, centre_term, centre_term.new_zeros(()))


def joint_loss(logits: Tensor, labels: Tensor, seg_logits: Tensor, pseudo_label: Tensor | np.ndarray,
               original_images: Tensor, roi: Tensor, dense_energy: nn.Module | None,
               seg_feature: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one training step: cls + split CE + dense energy [+ BCD when seg_feature is given].

    logits (B,C); labels (B,C) multi-hot; seg_logits (B,C+1,h,w) at feature resolution (C: the data
    set's class count); pseudo_label (B,H,W) in {0..C,255} at crop size; original_images (B,3,H,W) 0..255 (any dtype);
    roi (B,H,W) 1 = real pixel; dense_energy a DenseEnergyLoss or None to leave that term out;
    seg_feature (B,C,h,w) of the attention variant turns on the BCD term (on seg_logits).
    Returns the total and each term detached (0-d tensors on the loss's device, so that reading them
    is left to the logging point), keys 'cls', 'ce', ['dense'], ['bcd'], 'total'.
    """
    device = seg_logits.device
    pseudo_label = torch.as_tensor(pseudo_label).to(device=device, dtype=torch.long)
    seg_upsampled = F.interpolate(seg_logits, size=tuple(pseudo_label.shape[-2:]), mode="bilinear",
                                  align_corners=False)
    terms = {"cls": classification_loss(logits, labels.to(logits.device)),
             "ce": split_cross_entropy(seg_upsampled, pseudo_label)}
    if dense_energy is not None:
        probs = torch.softmax(seg_upsampled, dim=1)
        terms["dense"] = dense_energy(original_images.to(device=device, dtype=probs.dtype), probs,
                                      roi.to(device=device, dtype=probs.dtype), pseudo_label).to(device)
    if seg_feature is not None:
        terms["bcd"] = bcd_loss(seg_logits, seg_feature)
    total = sum(value.to(device) for value in terms.values())
    logged = {name: value.detach() for name, value in terms.items()}
    logged["total"] = total.detach()
    return total, logged
