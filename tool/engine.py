"""The one training engine behind train_from_init.py and train_from_cls_weight.py (SPEC §9).

A script declares its defaults (`build_parser(script_defaults, network_defaults)`), and
`run_training(args)` does the rest: model and weights, the 4 parameter groups, SGD and its lr
schedule, per step the 4-scale CAM forward, reliable-region mining, the joint loss, backward and
update; devices (CPU, CUDA, DataParallel, DDP under torchrun), AMP, logs and checkpoints. The data
set (`--dataset`, tool.datasets) gives the data classes and the class count of the network.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from network import build_segnet, resolve_network
from tool.allocator import add_memory_argument, apply_memory_choice
from tool.checkpoint import (atomic_write_text, capture_rng_state, load_resume_checkpoint, restore_rng_state,
                             save_model_weights, save_resume_checkpoint, unwrap_model)
from tool.cli import inputs_checked
from tool.crf import add_crf_backend_argument, resolve_crf_backend
from tool.datasets import add_dataset_arguments, data_module, resolve_data_root, resolve_dataset
from tool.dense_energy import DenseEnergyLoss
from tool.device import add_device_arguments, autocast_context, cores_per_process, pick_device, resolve_amp
from tool.losses import classification_loss, joint_loss
from tool.mining import ReliableRegionMiner, cam_label_maps, crop_norm_cams, mine_norm_cams
from tool.region_quality import (RegionCounts, count_region_quality, quality_summary, region_figures_by_prefix,
                                 summary_counts)
from tool.run_monitor import RunMonitor, training_scalars
from tool.schedule import OPTIMIZERS, SECOND_PHASE_LR, LearningRateSchedule, build_optimizer
from tool.train_batches import PositionSeededDataset, StepBatchSampler
from tool.visualize import fixed_batch, training_panels
from tool.weights import load_weights
from voc12.lists import DatasetInfo

# Released-style weight files: `<session>N.pth` every 2,000 steps once more than 10,000 are done.
WEIGHTS_EVERY = 2000
WEIGHTS_AFTER = 10000
# A resumed run must share every parsed flag with the run that wrote the checkpoint (a new flag is
# checked by default), except these, which cannot change the weights:
RESUME_MAY_DIFFER = frozenset({
    "resume",  # which checkpoint to continue from
    "save_dir", "session_name", "save_every", "log_every", "no_progress",  # where and how often files and logs go
    # Items are seeded by their position and the loader has its own generator; mining is deterministic.
    "num_workers", "released_num_workers", "mining_workers",
    "release_memory",  # allocator caching only
    # Which GPU (same kernels); the device type that does change results is compared as `device`.
    "gpu_id",
    "val_list",  # unused: the released classification validation is disabled
    "IMpath",  # must be <voc12_root>/JPEGImages, and data_root is compared
    "voc12_root", "data_root_flag",  # a spelling of data_root, which is compared
    "max_epoches",  # only gives max_step, which is compared as resolved
    "network_defaults", "dataset_defaults",  # recipe tables; the values they gave (lr, batch_size, ...) are compared
    # Watching a run: the ground-truth masks are read beside the augmentation (its draws are the
    # same), the panels' forward runs in eval mode without gradients, and neither draws random numbers.
    "tensorboard", "vis_every", "vis_images", "region_quality",
})
# --tensorboard's training panels: every VIS_EVERY updates, the first VIS_IMAGES training ids.
VIS_EVERY = 500
VIS_IMAGES = 4
# Prefixes of the reliable-region figures: the mined labels, and the CAM pseudo label before the CRFs.
MINED, CAM = "", "cam_"
# The name under which a checkpoint written before a key's renaming records it.
FORMER_RUN_KEYS = {"data_root": "voc12_root"}
RECIPE_TABLES = ("network_defaults", "dataset_defaults")

ModelFactory = Callable[[str, float], torch.nn.Module]


def build_parser(script_defaults: Mapping[str, Any], description: str = "") -> argparse.ArgumentParser:
    """Every flag of both scripts; `script_defaults` overrides defaults and declares the recipe
    (`schedule`: poly | two_phase, `augmentation`: init | scaled, `updates_past_max_step`).

    Flags whose default depends on the network (batch_size, max_step, max_epoches, lr,
    session_name) default to None here and are filled by `finalize_args` from
    `script_defaults['network_defaults'][variant]`, overridden for a data set other than VOC by
    `script_defaults['dataset_defaults'][dataset][variant]` (its recipe).
    """
    parser = argparse.ArgumentParser(description=description)
    data = parser.add_argument_group("data")
    add_dataset_arguments(data, "data set root (default VOC2012, or COCO2014 for coco14): VOC: JPEGImages/, "
                                "ImageSets/, cls_labels.npy; COCO: as `python -m coco14.prepare` leaves it")
    data.add_argument("--train_list", "--LISTpath", dest="train_list", default=None,
                      help="training ids (default <root>/ImageSets/Segmentation/train_aug.txt; COCO: "
                           "<root>/ImageSets/train2014.txt)")
    data.add_argument("--val_list", default=None,
                      help="accepted as released; the released classification validation is disabled, so unused")
    data.add_argument("--IMpath", "--IM_path", dest="IMpath", default=None,
                      help="VOC JPEG folder; must be <voc12_root>/JPEGImages (its parent is the default voc12_root)")
    data.add_argument("--cls_labels", default=None, help="class labels .npy (default <root>/cls_labels.npy)")
    data.add_argument("--crop_size", type=int, default=448)
    data.add_argument("--random_resize", action="store_true",
                      help="init augmentation (train_from_init.py): apply the random long-side resize 256-512 that "
                           "the released code computes but never applies (not released)")
    data.add_argument("--num_workers", type=int, default=None,
                      help="DataLoader worker processes per training process (default: the script's released "
                           "count, at most this process's share of the usable cores)")

    model = parser.add_argument_group("model")
    model.add_argument("--network", default="network.RRM", help="network.RRM or network.RRM(attention)")
    model.add_argument("--weights", default="none",
                       help=".params (MXNet ImageNet init), .pth, or 'none' (random initialisation)")
    model.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 = released network)")
    model.add_argument("--train_bn", action="store_true",
                       help="BatchNorms learn (batch statistics, trainable affine) instead of staying frozen as "
                            "released: for training from random weights")
    model.add_argument("--dropout_scale", type=float, default=1.0,
                       help="multiplies every dropout probability of the network (1 = released, 0 = no dropout)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=None, help="global batch (split over DDP processes)")
    optim.add_argument("--max_epoches", type=int, default=None, help="epochs; gives max_step = len(list)//batch*epochs")
    optim.add_argument("--max_step", type=int, default=None, help="number of scheduled updates (overrides epochs)")
    optim.add_argument("--lr", type=float, default=None)
    optim.add_argument("--cls_steps", type=int, default=None,
                       help="two_phase schedule: updates of phase 1 (classification only); default max_step / 2 as released")
    optim.add_argument("--seg_lr", type=float, default=None,
                       help=f"two_phase schedule: base lr of phase 2 (joint RRM training), every group "
                            f"(default {SECOND_PHASE_LR})")
    optim.add_argument("--wt_dec", type=float, default=5e-4)
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                       help="sgd (released) or adam (AdamW, same groups and lrs; not released: trains a "
                            "randomly initialised network several times faster)")
    optim.add_argument("--momentum", type=float, default=None,
                       help="SGD momentum (sgd only); default: the released quirk (momentum = --wt_dec)")
    optim.add_argument("--densecrfloss", type=float, default=1e-7, help="dense energy loss weight (0 = off)")
    optim.add_argument("--rloss-scale", dest="rloss_scale", type=float, default=0.5)
    optim.add_argument("--sigma-rgb", dest="sigma_rgb", type=float, default=15.0)
    optim.add_argument("--sigma-xy", dest="sigma_xy", type=float, default=100.0)
    optim.add_argument("--mining_workers", type=int, default=None,
                       help="processes mining pseudo labels per training process (0 = in-process; default: this "
                            "process's share of the usable cores: affinity and cgroup quota over torchrun's local "
                            "processes)")
    optim.add_argument("--seed", type=int, default=0)
    add_crf_backend_argument(optim)

    device = parser.add_argument_group("device")
    add_device_arguments(device)
    add_memory_argument(device)
    device.add_argument("--gpu_id", default=None,
                        help="sets CUDA_VISIBLE_DEVICES for this run as released (default: leave it as it is; "
                             "not under torchrun, which assigns GPUs by LOCAL_RANK)")

    output = parser.add_argument_group("output")
    output.add_argument("--session_name", default=None, help="prefix of every written file")
    output.add_argument("--save_dir", "--SAVEpath", dest="save_dir", default="runs")
    output.add_argument("--save_every", type=int, default=1000, help="resume checkpoint every N steps (and at the end)")
    output.add_argument("--log_every", type=int, default=50)
    output.add_argument("--no_progress", action="store_true", help="no tqdm bar (the log lines stay)")
    output.add_argument("--resume", default=None, help="resume checkpoint <save_dir>/<session>resume.pt to continue")

    watch = parser.add_argument_group("watching a run (none of these changes the weights)")
    watch.add_argument("--tensorboard", action="store_true",
                       help="TensorBoard events under <save_dir>/tensorboard/<session_name> (rank 0): every loss "
                            "term, the lr of each parameter group, images/s, the reliable-region figures of "
                            "--region_quality, and training panels every --vis_every updates")
    watch.add_argument("--vis_every", type=int, default=None,
                       help=f"with --tensorboard: panels (input | CAM | reliable labels | prediction) every N "
                            f"updates (default {VIS_EVERY})")
    watch.add_argument("--vis_images", type=int, default=None,
                       help=f"with --tensorboard: the panels show the first N training ids, centre-cropped "
                            f"without augmentation (default {VIS_IMAGES})")
    watch.add_argument("--region_quality", action="store_true",
                       help="read each training id's ground-truth mask (VOC: SegmentationClass or "
                            "SegmentationClassAug; COCO: the prepared masks), cropped as its image, and log the "
                            "precision and coverage of the mined labels and of the CAM labels before the CRFs "
                            "(metrics JSONL, TensorBoard, <session>region_quality.json); ids without a mask are "
                            "left out")

    # The script's DataLoader count is the released one; finalize_args caps it by the usable cores.
    recipe = {"dataset_defaults": {}, **script_defaults}
    recipe["released_num_workers"] = recipe.pop("num_workers", 8)
    parser.set_defaults(**recipe)
    return parser


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill network-dependent defaults and data paths; reject inconsistent values (no file access)."""
    variant = resolve_network(args.network).SegNet.variant
    info = resolve_dataset(args.dataset)
    recipe = {**args.network_defaults[variant], **args.dataset_defaults.get(args.dataset, {}).get(variant, {})}
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "data_root_flag", None) is None:  # finalising finalised args changes nothing
        _resolve_root(args, info)
    if args.train_list is None:
        args.train_list = info.list_path(args.data_root, info.train_split)
    if args.val_list is None:
        args.val_list = info.list_path(args.data_root, info.val_split)
    if args.cls_labels is None:
        args.cls_labels = info.cls_labels_path(args.data_root)
    if args.max_step is None and args.max_epoches is None:
        raise ValueError("give --max_step or --max_epoches")
    for name in ("batch_size", "crop_size", "log_every", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_step is not None and args.max_step < 1:
        raise ValueError(f"--max_step must be >= 1, got {args.max_step}")
    # A flag the recipe would ignore is an error, not a silent no-op.
    for name in ("cls_steps", "seg_lr"):
        if getattr(args, name) is not None and args.schedule != "two_phase":
            raise ValueError(f"--{name} needs the two_phase schedule (train_from_init.py), not {args.schedule}")
    if args.schedule == "two_phase" and args.seg_lr is None:
        args.seg_lr = SECOND_PHASE_LR
    if args.momentum is not None and args.optimizer != "sgd":
        raise ValueError(f"--momentum applies to --optimizer sgd only, not {args.optimizer}")
    if args.random_resize and args.augmentation != "init":
        raise ValueError(f"--random_resize applies to the init augmentation (train_from_init.py), "
                         f"not {args.augmentation}")
    if not 0 <= args.dropout_scale <= 1:
        raise ValueError(f"--dropout_scale must be in [0, 1], got {args.dropout_scale}")
    if args.mining_workers is not None and args.mining_workers < 0:
        raise ValueError(f"--mining_workers must be >= 0, got {args.mining_workers}")
    for name, default in (("vis_every", VIS_EVERY), ("vis_images", VIS_IMAGES)):
        value = getattr(args, name)
        if value is not None and not args.tensorboard:
            raise ValueError(f"--{name} needs --tensorboard (the panels go to its event files)")
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
        if args.tensorboard and value is None:
            setattr(args, name, default)
    if args.num_workers is None:
        args.num_workers = min(args.released_num_workers, cores_per_process())
    elif args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {args.num_workers}")
    return args


def _resolve_root(args: argparse.Namespace, info: DatasetInfo) -> None:
    """args.data_root from --data_root / --voc12_root / --IMpath / the data set's default, and
    args.data_root_flag, the flag that messages name it by."""
    args.data_root, args.data_root_flag = resolve_data_root(args, None)
    if args.IMpath is not None:
        if info.has_split_folders:
            raise ValueError(f"--IMpath is the VOC image folder; {info.title} images are found under "
                             f"<data_root>/<split>/ by their names")
        if args.data_root is None and not os.path.isdir(info.default_root):
            args.data_root = os.path.dirname(os.path.normpath(args.IMpath))  # released: its parent is the root
    if args.data_root is None:
        args.data_root = info.default_root
    if args.IMpath is not None and os.path.normpath(args.IMpath) != os.path.normpath(info.image_dir(args.data_root)):
        raise ValueError(f"--IMpath {args.IMpath} is not <{args.data_root_flag[2:]}>/JPEGImages of "
                         f"{args.data_root_flag} {args.data_root}")


def check_inputs(args: argparse.Namespace) -> None:
    """Every file the run needs, checked before any work starts (the error names the path)."""
    required = [("--resume checkpoint", args.resume)] if args.resume else []
    if args.weights != "none" and not args.resume:
        required.append(("--weights file", args.weights))
    required += [("--train_list", args.train_list), ("--cls_labels file", args.cls_labels)]
    if not os.path.isdir(args.data_root):
        raise FileNotFoundError(f"{args.data_root_flag} not found: {args.data_root} is not a directory")
    for what, path in required:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} not found: {path}")


@dataclass
class Runtime:
    """Where this process runs: device, distributed rank/world, DataParallel."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False
    data_parallel: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def apply_gpu_id(gpu_id: str | None, launched_by_torchrun: bool) -> None:
    """`--gpu_id` as released: CUDA_VISIBLE_DEVICES, but only while this process's CUDA starts. The
    variable is then restored, so a caller's environment and later child processes keep theirs."""
    if gpu_id is None:
        return
    if launched_by_torchrun:
        raise ValueError("--gpu_id cannot be used under torchrun, which gives each process the GPU of its "
                         "LOCAL_RANK; set CUDA_VISIBLE_DEVICES for torchrun instead")
    if torch.cuda.is_initialized():
        raise ValueError(f"--gpu_id {gpu_id}: CUDA is already initialised in this process, so the visible "
                         f"GPUs are fixed; choose one with --device cuda:N")
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_id)
    try:
        if not torch.cuda.is_available():
            raise ValueError(f"--gpu_id {gpu_id}: no CUDA device is visible")
        torch.cuda.init()  # CUDA reads the variable once, here
    finally:
        if previous is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """torchrun (RANK/WORLD_SIZE set) -> DDP over NCCL (CUDA) or Gloo (CPU); else one process,
    with DataParallel when several GPUs are visible."""
    launched_by_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    apply_gpu_id(args.gpu_id, launched_by_torchrun)
    device = pick_device(args.device)
    if args.gpu_id is not None and device.type != "cuda":
        raise ValueError(f"--gpu_id {args.gpu_id} selects GPUs, but --device {args.device} is not CUDA")
    apply_memory_choice(args.release_memory)
    use_cuda = device.type == "cuda"
    resolve_amp(args.amp, device)  # an impossible --amp fails before any work
    if launched_by_torchrun:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return Runtime(device, dist.get_rank(), dist.get_world_size(), distributed=True)
    data_parallel = use_cuda and args.device in ("auto", "cuda") and torch.cuda.device_count() > 1
    return Runtime(device, data_parallel=data_parallel)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_dataset(args: argparse.Namespace) -> torch.utils.data.Dataset:
    """The training set of `args.dataset` with the script's augmentation (finalised args)."""
    datasets = data_module(args.dataset)
    if args.augmentation == "init":
        return datasets.TrainDatasetInit(args.data_root, args.train_list, args.cls_labels, args.crop_size,
                                         apply_random_resize=args.random_resize, load_gt=args.region_quality)
    if args.augmentation == "scaled":
        return datasets.TrainDatasetScaled(args.data_root, args.train_list, args.cls_labels, args.crop_size,
                                           load_gt=args.region_quality)
    raise ValueError(f"unknown augmentation {args.augmentation!r}; valid: init, scaled")


def compute_max_step(args: argparse.Namespace, num_items: int) -> int:
    """--max_step, else the released len(list) // batch * epochs."""
    if args.max_step is not None:
        return args.max_step
    max_step = num_items // args.batch_size * args.max_epoches
    if max_step < 1:
        raise ValueError(f"{args.train_list} has {num_items} ids: fewer than one --batch_size {args.batch_size} batch")
    return max_step


@dataclass
class StepResult:
    terms: dict[str, float] | dict[str, torch.Tensor]
    classification_only: bool
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)
    # Reliable-region counts by prefix (MINED, CAM) of a joint update whose batch has 'gt'; else empty.
    quality: dict[str, RegionCounts] = field(default_factory=dict)


def scale_dropout(model: torch.nn.Module, factor: float) -> None:
    """Multiply the probability of every dropout layer by `factor` (a small model trained from scratch
    for a few hundred steps learns faster without the released 0.3/0.5 dropouts)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p *= factor


class Trainer:
    """Model, optimiser, schedule and loss pieces of one run; `step` makes one update."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime, max_step: int,
                 model_factory: ModelFactory | None = None) -> None:
        self.args = args
        self.runtime = runtime
        self.max_step = max_step
        seed_everything(args.seed)  # same initialisation on every rank
        info = resolve_dataset(args.dataset)
        model = (model_factory or functools.partial(build_segnet, num_classes=info.num_classes))(
            args.network, args.width)
        if model.num_classes != info.num_classes:
            raise ValueError(f"the model has {model.num_classes} classes but --dataset {args.dataset} "
                             f"has {info.num_classes}")
        self.num_labels = info.num_seg_classes
        if args.weights != "none" and not args.resume:
            load_weights(model, args.weights)
        scale_dropout(model, args.dropout_scale)
        if args.train_bn:
            model.set_batchnorm_training(True)
        model.to(runtime.device)
        self.optimizer = build_optimizer(model.get_parameter_groups(), args.lr, args.wt_dec, args.momentum,
                                         args.optimizer)
        self.schedule = LearningRateSchedule(args.schedule, [g["lr"] for g in self.optimizer.param_groups], max_step,
                                             args.cls_steps, args.seg_lr)
        if runtime.distributed:
            # Phase 1 of train_from_init leaves the seg head without gradients.
            self.model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                find_unused_parameters=args.schedule == "two_phase")
        elif runtime.data_parallel:
            self.model = torch.nn.DataParallel(model)
        else:
            self.model = model
        self.model.train()
        self.grad_scaler = torch.amp.GradScaler("cuda") if resolve_amp(args.amp, runtime.device) == "fp16" else None
        self.crf_backend = resolve_crf_backend(args.crf_backend, runtime.device)
        if self.crf_backend == "torch" and args.mining_workers is not None:
            raise ValueError("--mining_workers applies to --crf_backend pydensecrf; the torch backend mines on "
                             f"{runtime.device} in this process")
        self.dense_energy = (DenseEnergyLoss(weight=args.densecrfloss, sigma_rgb=args.sigma_rgb,
                                             sigma_xy=args.sigma_xy, scale_factor=args.rloss_scale,
                                             backend=self.crf_backend)
                             if args.densecrfloss > 0 else None)
        self.miner = ReliableRegionMiner(args.mining_workers) if self.crf_backend == "pydensecrf" else None

    def close(self) -> None:
        if self.miner is not None:
            self.miner.close()

    def step(self, batch: Mapping[str, Any], t: int, timed: bool = False) -> StepResult:
        """`update`, then the logging point: the loss terms as floats and the region counts as numpy
        integers, in the step's only device-to-host copy."""
        result = self.update(batch, t, timed)
        terms = torch.stack(list(result.terms.values()))
        if not result.quality:
            result.terms = dict(zip(result.terms, terms.tolist()))
            return result
        # Counts < 2^53 are exact in float64, as are the float32 terms.
        values = torch.cat([terms.double(), *(counts.as_vector().to(terms.device, torch.float64)
                                              for counts in result.quality.values())]).tolist()
        result.terms = dict(zip(result.terms, values[:len(result.terms)]))
        size = 3 + 2 * self.num_labels
        offsets = range(len(result.terms), len(values), size)
        result.quality = {prefix: RegionCounts.from_vector(values[offset:offset + size], self.num_labels)
                          for prefix, offset in zip(result.quality, offsets)}
        return result

    def update(self, batch: Mapping[str, Any], t: int, timed: bool = False) -> StepResult:
        """Update t (t updates already made): set the lr, forward, mine, losses, backward, step.
        The terms stay 0-d tensors on the device (with the torch CRF backend nothing here waits on it).
        A joint update of a batch with ground truth ('gt', from the data set's load_gt) also counts
        the quality of the mined and of the CAM labels, on the device too."""
        device = self.runtime.device
        clock = _StageClock(timed, device)
        quality: dict[str, RegionCounts] = {}
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        self.schedule.apply(self.optimizer, t)
        cls_only = self.schedule.classification_only(t)
        with autocast_context(self.args.amp, device):
            if cls_only:
                outputs = self.model(images, require_seg=False, require_mcam=False)
            else:
                outputs = self.model(images, require_seg=True, require_mcam=True)
        clock.lap("forward")
        if cls_only:
            loss = classification_loss(outputs.float(), labels)
            terms = {"cls": loss.detach(), "total": loss.detach()}
        else:
            logits, cam, seg = outputs[0], outputs[1], outputs[2]
            seg = seg[0] if isinstance(seg, (list, tuple)) else seg
            seg_feature = outputs[3].float() if len(outputs) == 4 else None
            norm_cams = crop_norm_cams(cam, batch["label"], batch["original"].shape[-2:], self.miner is None)
            pseudo_label = mine_norm_cams(norm_cams, batch["label"], batch["original"], self.miner)
            clock.lap("mining")
            if "gt" in batch:
                cam_label = cam_label_maps(norm_cams, batch["label"])
                quality = {prefix: count_region_quality(label_map, batch["gt"], self.num_labels)
                           for prefix, label_map in ((MINED, pseudo_label), (CAM, cam_label))}
                clock.lap("quality")
            # Losses in float32 (dense energy and CE need it); autocast is off out here.
            loss, terms = joint_loss(logits.float(), labels, seg.float(), pseudo_label,
                                     batch["original"], batch["roi"], self.dense_energy, seg_feature)
        clock.lap("losses")
        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
        else:
            loss.backward()
        clock.lap("backward")
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        clock.lap("step")
        return StepResult(terms, cls_only, clock.timings, clock.cpu_timings, quality)


class _StageClock:
    """Wall time and this process's CPU time per stage (synchronising CUDA) when timed, else free."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.timings: dict[str, float] = {}
        self.cpu_timings: dict[str, float] = {}
        self.last = time.perf_counter()
        self.last_cpu = time.process_time()

    def lap(self, stage: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now, now_cpu = time.perf_counter(), time.process_time()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.cpu_timings[stage] = self.cpu_timings.get(stage, 0.0) + now_cpu - self.last_cpu
        self.last, self.last_cpu = now, now_cpu


class RunLog:
    """Rank 0's outputs: tqdm bar, the released log line (also into <session>.log), JSON-lines metrics;
    with --tensorboard the event files; with --region_quality each update's figures (in its metrics
    record and as scalars) and their totals over the run in <session>region_quality.json."""

    def __init__(self, args: argparse.Namespace, max_step: int, total_steps: int, start_step: int,
                 enabled: bool) -> None:
        self.enabled = enabled
        self.args = args
        self.max_step = max_step
        self.total_steps = total_steps
        self.losses: list[float] = []
        self.start_time = self.last_update_time = time.time()
        self.start_step = start_step
        self.label_names = resolve_dataset(args.dataset).seg_class_names
        self.quality_totals: dict[str, RegionCounts] = {}
        self.quality_first_step = start_step
        self.monitor: RunMonitor | None = None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled or args.no_progress,
                        dynamic_ncols=True)
        if enabled and args.tensorboard:
            # purge_step: TensorBoard hides what an earlier run of the session logged from here on
            # (the updates an interrupted run made after its checkpoint; all of a run started afresh).
            self.monitor = RunMonitor(os.path.join(args.save_dir, "tensorboard", args.session_name),
                                      purge_step=start_step)
        if enabled and args.region_quality and args.resume:
            self._continue_quality_totals(start_step)
        if enabled:
            os.makedirs(args.save_dir, exist_ok=True)
            text_path = os.path.join(args.save_dir, f"{args.session_name}.log")
            metrics_path = os.path.join(args.save_dir, f"{args.session_name}metrics.jsonl")
            if args.resume:
                # The updates from the checkpoint on are redone: drop what the interrupted run logged for them.
                self._drop_redone(text_path, start_step, self._text_step, keep_unstepped=True)
                self._drop_redone(metrics_path, start_step, self._metrics_step, keep_unstepped=False)
            self.text = open(text_path, "a")
            self.metrics = open(metrics_path, "a")
            self.text.write(json.dumps({k: v for k, v in vars(args).items() if k not in RECIPE_TABLES}) + "\n")

    @staticmethod
    def _text_step(line: str) -> int | None:
        """The update a text log line reports (`finished N updates` counts as N), None for a settings line."""
        match = re.match(r"Iter:\s*(\d+)/|finished (\d+) updates", line)
        return None if match is None else int(match.group(1) or match.group(2))

    @staticmethod
    def _metrics_step(line: str) -> int | None:
        """The step of a metrics record, None for a line torn by a crash."""
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _drop_redone(path: str, start_step: int, step_of: Callable[[str], int | None], keep_unstepped: bool) -> None:
        """Rewrite `path` (atomically) without the lines of the interrupted trajectory from `start_step` on:
        everything from the first line at a step >= start_step after the last line before it. Earlier
        runs of the same session stay. Lines without a step are kept before the cut if `keep_unstepped`."""
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        steps = [step_of(line) for line in lines]
        last_before = max((i for i, step in enumerate(steps) if step is not None and step < start_step), default=-1)
        cut = next((i for i in range(last_before + 1, len(lines)) if steps[i] is not None and steps[i] >= start_step),
                   len(lines))
        kept = [line for line, step in zip(lines[:cut], steps[:cut]) if keep_unstepped or step is not None]
        atomic_write_text("".join(line + "\n" for line in kept), path)

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)
            self.text.write(text + "\n")
            self.text.flush()

    def _continue_quality_totals(self, start_step: int) -> None:
        """Continue the totals of the interrupted run if its summary was written at the checkpoint
        resumed from (else they start again at start_step, and the summary says so)."""
        try:
            with open(session_path(self.args, "region_quality.json"), encoding="utf-8") as handle:
                summary = json.load(handle)
            if summary["steps_done"] == start_step:
                self.quality_totals = summary_counts(summary, len(self.label_names))
                self.quality_first_step = int(summary["first_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # no usable summary: a partial one is better than a failed run

    def after_update(self, t: int, result: StepResult, lrs: Sequence[float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        self.losses.append(result.terms["total"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.terms['total']:.4f}", lr=f"{lrs[0]:.2e}")
        figures = region_figures_by_prefix(result.quality)
        for prefix, counts in result.quality.items():
            total = self.quality_totals.get(prefix)
            self.quality_totals[prefix] = counts if total is None else total + counts
        record = {"step": t, "lr": list(lrs), "classification_only": result.classification_only,
                  "time": now, **result.terms, **figures}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.monitor is not None:
            images_per_second = self.args.batch_size / max(now - self.last_update_time, 1e-9)
            self.monitor.log_scalars(t, training_scalars(result.terms, lrs, images_per_second, figures))
        self.last_update_time = now
        if t % self.args.log_every == 0:
            elapsed = max(time.time() - self.start_time, 1e-9)
            done = t + 1 - self.start_step
            finish = self.start_time + elapsed / done * (self.total_steps - self.start_step)
            self.line(f"Iter:{t:5d}/{self.max_step:5d} Loss:{np.mean(self.losses):.4f} "
                      f"imps:{done * self.args.batch_size / elapsed:.1f} Fin:{time.ctime(finish)} lr: {lrs[0]:.4f}")
            self.losses = []

    def log_panels(self, t: int, panels: Sequence[tuple[str, np.ndarray]]) -> None:
        if self.monitor is not None:
            self.monitor.log_panels(t, panels)

    def save_quality_totals(self, steps_done: int) -> None:
        """<session>region_quality.json: the figures and per-class precision of the updates from
        quality_first_step to steps_done (written beside each resume checkpoint, so a resumed run
        continues them)."""
        if not self.enabled or not self.quality_totals:
            return
        summary = {"first_step": self.quality_first_step, "steps_done": steps_done,
                   **quality_summary(self.quality_totals, self.label_names)}
        atomic_write_text(json.dumps(summary, indent=1) + "\n", session_path(self.args, "region_quality.json"))

    def report_quality(self, steps_done: int) -> None:
        """The run's reliable-region figures in one log line (none without any)."""
        if not self.quality_totals:
            return
        figures = region_figures_by_prefix(self.quality_totals)

        def percent(key: str) -> str:
            return "n/a" if figures.get(key) is None else f"{100 * figures[key]:.1f}%"
        self.line(f"reliable regions vs ground truth, updates {self.quality_first_step}-{steps_done - 1}: "
                  f"precision {percent(MINED + 'precision')} (CAM labels {percent(CAM + 'precision')}), "
                  f"coverage {percent(MINED + 'coverage')}; per class: "
                  f"{session_path(self.args, 'region_quality.json')}")

    def close(self) -> None:
        self.bar.close()
        if self.monitor is not None:
            self.monitor.close()
        if self.enabled:
            self.text.close()
            self.metrics.close()


def _ground_truth_note(dataset: torch.utils.data.Dataset, list_path: str) -> str | None:
    """The line that says which training ids --region_quality cannot score (None: all have a mask)."""
    missing = sum(path is None for path in dataset.mask_paths)
    if not missing:
        return None
    folders = " or ".join(dataset.info.mask_folders)
    if missing == len(dataset.mask_paths):
        return (f"--region_quality: none of the {missing} ids of {list_path} has a ground-truth mask ({folders} "
                f"under {dataset.root}): no precision or coverage is logged")
    return (f"--region_quality: {missing} of the {len(dataset.mask_paths)} ids of {list_path} have no ground-truth "
            f"mask ({folders} under {dataset.root}): their pixels are not counted")


def _reduce_over_ranks(terms: dict[str, float], quality: dict[str, RegionCounts],
                       runtime: Runtime) -> tuple[dict[str, float], dict[str, RegionCounts]]:
    """Each logged loss term averaged and each region count summed over DDP ranks (for the log
    only), in one all-reduce: counts travel as float64, exact below 2^53."""
    if not runtime.distributed:
        return terms, quality
    names = sorted(terms)
    vectors = [counts.as_vector().cpu().to(torch.float64) for counts in quality.values()]
    values = torch.cat([torch.tensor([terms[name] for name in names], dtype=torch.float64), *vectors])
    values = values.to(runtime.device if runtime.device.type == "cuda" else "cpu")
    dist.all_reduce(values)
    values = values.cpu()
    mean_terms = {name: float(value) / runtime.world_size for name, value in zip(names, values[:len(names)].tolist())}
    parts = values[len(names):].split([vector.numel() for vector in vectors])
    summed = {prefix: RegionCounts.from_vector(part.numpy(), counts.num_labels)
              for (prefix, counts), part in zip(quality.items(), parts)}
    return mean_terms, summed


def session_path(args: argparse.Namespace, suffix: str) -> str:
    return os.path.join(args.save_dir, f"{args.session_name}{suffix}")


def _run_config(args: argparse.Namespace, max_step: int, runtime: Runtime) -> dict[str, Any]:
    """The settings that decide the weights: every flag but RESUME_MAY_DIFFER, resolved where a
    different spelling gives the same run (`--device auto` on a CPU machine is `cpu`)."""
    config = {key: value for key, value in vars(args).items() if key not in RESUME_MAY_DIFFER}
    # CUDA and CPU differ in kernels and in the generator dropout draws from; DataParallel splits batches.
    config.update(max_step=max_step, device=runtime.device.type, data_parallel=runtime.data_parallel,
                  amp=resolve_amp(args.amp, runtime.device))
    return config


def _save_resume(trainer: Trainer, args: argparse.Namespace, runtime: Runtime, steps_done: int,
                 max_step: int) -> str:
    path = session_path(args, "resume.pt")
    rng_states = [capture_rng_state()]
    if runtime.distributed:
        rng_states = [None] * runtime.world_size
        dist.all_gather_object(rng_states, capture_rng_state())
    if runtime.is_main:
        save_resume_checkpoint(path, model=trainer.model, optimizer=trainer.optimizer, step=steps_done,
                               data_position={"step": steps_done}, grad_scaler=trainer.grad_scaler,
                               run_config={**_run_config(args, max_step, runtime), "rng_per_rank": rng_states})
    return path


def _restore(trainer: Trainer, args: argparse.Namespace, runtime: Runtime, max_step: int) -> int:
    checkpoint = load_resume_checkpoint(args.resume)
    saved = checkpoint["run_config"]
    expected = _run_config(args, max_step, runtime)
    # A key a checkpoint lacks was written before its flag existed: that run had the flag's default.
    flag_defaults = build_parser({})
    different = []
    for key in sorted(expected):
        if key not in saved and FORMER_RUN_KEYS.get(key) in saved:
            saved = {**saved, key: saved[FORMER_RUN_KEYS[key]]}
        before = saved[key] if key in saved else flag_defaults.get_default(key)
        if before != expected[key]:
            recorded = repr(before) if key in saved else f"not recorded, so the default {before!r}"
            different.append(f"{key}: checkpoint {recorded} vs now {expected[key]!r}")
    if different:
        raise ValueError(f"--resume {args.resume} was written by a different run: " + "; ".join(different))
    unwrap_model(trainer.model).load_state_dict(checkpoint["model"])
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    if trainer.grad_scaler is not None and checkpoint["grad_scaler"] is not None:
        trainer.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    rng_states = saved["rng_per_rank"]
    if len(rng_states) != runtime.world_size:
        raise ValueError(f"--resume {args.resume} was written by {len(rng_states)} process(es); "
                         f"now {runtime.world_size}: the random streams cannot continue exactly")
    restore_rng_state(rng_states[runtime.rank])
    return int(checkpoint["data_position"]["step"])


@dataclass
class TrainingResult:
    steps_done: int
    max_step: int
    final_weights: str | None
    resume_checkpoint: str
    last_terms: dict[str, float]


def run_training(args: argparse.Namespace, *, model_factory: ModelFactory | None = None,
                 stop_after: int | None = None) -> TrainingResult:
    """Train as the script's args say. `stop_after` ends after that many updates in total (with a
    resume checkpoint, without final weights), as an interrupted run would."""
    args = finalize_args(args)
    check_inputs(args)
    runtime = setup_runtime(args)
    dataset = build_dataset(args)
    # A corrupt image stops the run now, with its name; each process checks its share of the list.
    dataset.check_images(args.num_workers, part=runtime.rank, parts=runtime.world_size)
    max_step = compute_max_step(args, len(dataset))
    total_steps = max_step + args.updates_past_max_step
    # Everything built from here on is closed on any error, a refused resume included.
    with contextlib.ExitStack() as resources:
        trainer = Trainer(args, runtime, max_step, model_factory)
        resources.callback(trainer.close)
        start_step = _restore(trainer, args, runtime, max_step) if args.resume else 0
        if not args.resume:
            seed_everything(args.seed + runtime.rank)  # each rank its own dropout stream
        stop_step = total_steps if stop_after is None else min(total_steps, stop_after)
        sampler = StepBatchSampler(len(dataset), args.batch_size, order=args.batch_order, seed=args.seed,
                                   start_step=start_step, stop_step=stop_step, rank=runtime.rank,
                                   world_size=runtime.world_size, per_batch_scale=args.augmentation == "scaled")
        loader = DataLoader(PositionSeededDataset(dataset), batch_sampler=sampler, num_workers=args.num_workers,
                            pin_memory=runtime.device.type == "cuda",
                            # Its own generator: starting the loader must not draw from the global (dropout) RNG.
                            generator=torch.Generator().manual_seed(args.seed))
        log = RunLog(args, max_step, total_steps, start_step, runtime.is_main)
        resources.callback(log.close)
        note = _ground_truth_note(dataset, args.train_list) if args.region_quality else None
        if note is not None:
            log.line(note)
        panel_set = (fixed_batch(dataset, range(min(args.vis_images, len(dataset))))
                     if log.monitor is not None else None)

        def save_resume(steps_done: int) -> str:
            log.save_quality_totals(steps_done)
            return _save_resume(trainer, args, runtime, steps_done, max_step)

        inputs_checked()  # from here on an error is the run's own: run_cli keeps its traceback
        terms: dict[str, float] = {}
        steps_done = start_step
        for t, batch in zip(range(start_step, stop_step), loader):
            result = trainer.step(batch, t)
            steps_done = t + 1
            result.terms, result.quality = _reduce_over_ranks(result.terms, result.quality, runtime)
            terms = result.terms
            log.after_update(t, result, [g["lr"] for g in trainer.optimizer.param_groups])
            if panel_set is not None and t % args.vis_every == 0:
                # The network itself, not its DDP wrapper: only rank 0 runs this forward.
                log.log_panels(t, training_panels(unwrap_model(trainer.model), panel_set, trainer.miner,
                                                  result.classification_only))
            if runtime.is_main and t % WEIGHTS_EVERY == 0 and steps_done > WEIGHTS_AFTER:
                save_model_weights(trainer.model, session_path(args, f"{t}.pth"))
            if steps_done % args.save_every == 0 and steps_done < stop_step:
                save_resume(steps_done)
        resume_path = save_resume(steps_done)
        final_path = None
        if steps_done == total_steps:
            final_path = session_path(args, "final.pth")
            if runtime.is_main:
                save_model_weights(trainer.model, final_path)
                log.line(f"finished {steps_done} updates; weights: {final_path}")
        log.report_quality(steps_done)
    if runtime.distributed:
        dist.barrier()
    return TrainingResult(steps_done, max_step, final_path, resume_path, terms)


def main(script_defaults: Mapping[str, Any], description: str, argv: Sequence[str] | None = None) -> TrainingResult:
    """CLI entry of a training script."""
    args = build_parser(script_defaults, description).parse_args(argv)
    try:
        return run_training(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
