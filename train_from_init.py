"""Train RRM end to end from the ImageNet (MXNet) initialisation of ResNet-38 (SPEC §9), on VOC or COCO (--dataset).

Phase 1 (first half of max_step) trains classification only, phase 2 the full RRM loss.
Every flag: `python train_from_init.py --help`; multi-GPU/multi-node: `torchrun ... train_from_init.py`.
"""
from tool.cli import run_cli
from tool.engine import main

DEFAULTS = {
    "schedule": "two_phase",
    "augmentation": "init",
    "batch_order": "epochs",
    "updates_past_max_step": 0,
    "weights": "./netWeights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params",
    "crop_size": 448,
    "wt_dec": 5e-4,
    "num_workers": 32,
    "network_defaults": {
        "rrm": {"batch_size": 8, "max_epoches": 24, "lr": 0.01, "session_name": "RRM_"},
        "rrm_attention": {"batch_size": 8, "max_epoches": 48, "lr": 0.01, "session_name": "RRM(attention)_"},
    },
    # Scaled from VOC's, unmeasured: ~4x VOC's updates (31,728), as WSSS COCO recipes take 4x VOC's steps.
    "dataset_defaults": {
        "coco14": {"rrm": {"max_epoches": 12, "session_name": "RRM_coco14_"},
                   "rrm_attention": {"max_epoches": 24, "session_name": "RRM(attention)_coco14_"}},
    },
}

if __name__ == "__main__":
    run_cli("train_from_init.py", main, DEFAULTS, __doc__)
