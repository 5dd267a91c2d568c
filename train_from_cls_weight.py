"""Train RRM from a ResNet-38 trained for classification (VOC12: `res38_cls.pth`, SPEC §9; COCO: --dataset coco14).

Poly learning rate over max_step updates plus the released final update at t = max_step.
Every flag: `python train_from_cls_weight.py --help`; multi-GPU/multi-node: `torchrun ...`.
"""
from tool.cli import run_cli
from tool.engine import main

DEFAULTS = {
    "schedule": "poly",
    "augmentation": "scaled",
    "batch_order": "stream",
    # The released loop runs range(max_step + 1): one more update, at the last lr.
    "updates_past_max_step": 1,
    "weights": "./netWeights/res38_cls.pth",
    "crop_size": 321,
    "wt_dec": 1e-5,
    "num_workers": 16,
    "network_defaults": {
        "rrm": {"batch_size": 4, "max_step": 20000, "lr": 0.0007, "session_name": "RRM_"},
        "rrm_attention": {"batch_size": 8, "max_step": 40000, "lr": 0.001, "session_name": "RRM(attention)_"},
    },
    # Scaled from VOC's, unmeasured: 4x VOC's updates, as WSSS COCO recipes take 4x VOC's steps.
    "dataset_defaults": {
        "coco14": {"rrm": {"max_step": 80000, "session_name": "RRM_coco14_"},
                   "rrm_attention": {"max_step": 160000, "session_name": "RRM(attention)_coco14_"}},
    },
}

if __name__ == "__main__":
    run_cli("train_from_cls_weight.py", main, DEFAULTS, __doc__)
