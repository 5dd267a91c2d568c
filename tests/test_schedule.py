"""Optimiser groups and lr schedules against SPEC §9, recomputed here from the formulas."""
import math

import pytest
import torch

from tool.schedule import LearningRateSchedule, build_optimizer


def _groups():
    return [[torch.nn.Parameter(torch.ones(2))] for _ in range(4)]


def test_optimizer_groups_multipliers_decay_and_momentum_quirk():
    optimizer = build_optimizer(_groups(), lr=0.01, weight_decay=5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0, 5e-4, 0.0]
    # The released SGD(params, lr, weight_decay) puts the decay value in the momentum slot.
    assert all(g["momentum"] == 5e-4 for g in optimizer.param_groups)
    real = build_optimizer(_groups(), lr=0.01, weight_decay=5e-4, momentum=0.9)
    assert all(g["momentum"] == 0.9 for g in real.param_groups)


def test_optimizer_update_matches_hand_computed_sgd_with_quirk_momentum():
    params = _groups()
    optimizer = build_optimizer(params, lr=0.1, weight_decay=0.5)
    for group_params in params:
        group_params[0].grad = torch.full((2,), 2.0)
    optimizer.step()
    # group 0: w - lr*(g + wd*w) = 1 - 0.1*(2 + 0.5); group 1 (x2 lr, no decay): 1 - 0.2*2
    assert params[0][0].detach().tolist() == pytest.approx([0.75, 0.75])
    assert params[1][0].detach().tolist() == pytest.approx([0.6, 0.6])
    assert params[2][0].detach().tolist() == pytest.approx([1 - 1.0 * 2.5] * 2)
    assert params[3][0].detach().tolist() == pytest.approx([1 - 2.0 * 2] * 2)
    # Second step: buffer = momentum*buf + grad, momentum = 0.5 (the decay value).
    before = params[1][0].detach().clone()
    params[1][0].grad = torch.full((2,), 2.0)
    optimizer.step()
    assert (before - params[1][0].detach()).tolist() == pytest.approx([0.2 * (0.5 * 2 + 2)] * 2)


def test_adam_option_matches_hand_computed_adamw_step():
    params = _groups()
    optimizer = build_optimizer(params, lr=0.1, weight_decay=0.5, kind="adam")
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.2, 1.0, 2.0])
    for group_params, grad in zip(params, (2.0, -3.0, 2.0, 0.5)):
        group_params[0].grad = torch.full((2,), grad)
    optimizer.step()
    # First AdamW step: w * (1 - lr*wd) - lr * g / (|g| + eps), bias corrections cancel.
    expected = [1 * (1 - 0.1 * 0.5) - 0.1, 1 + 0.2, 1 * (1 - 1.0 * 0.5) - 1.0, 1 - 2.0]
    for group_params, value in zip(params, expected):
        assert group_params[0].detach().tolist() == pytest.approx([value] * 2, abs=1e-6)


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; valid: sgd, adam"):
        build_optimizer(_groups(), lr=0.1, weight_decay=0.0, kind="rmsprop")


def test_wrong_number_of_groups_is_an_error():
    with pytest.raises(ValueError, match="4 parameter groups"):
        build_optimizer(_groups()[:3], lr=0.1, weight_decay=0.0)


@pytest.mark.parametrize("t", [0, 1, 777, 19999, 20000, 20001])
def test_poly_schedule(t):
    max_step, lr = 20000, 0.0007
    initial = [lr, 2 * lr, 10 * lr, 20 * lr]
    schedule = LearningRateSchedule("poly", initial, max_step)
    got = schedule.lrs_at(t)
    if t >= max_step:
        assert got is None  # left as it is
    else:
        assert got == pytest.approx([base * math.pow(1 - t / max_step, 0.9) for base in initial], rel=1e-12)
    assert not schedule.classification_only(t)


@pytest.mark.parametrize("t", [0, 5, 15863, 15864, 15865, 20000, 31727, 31728])
def test_two_phase_schedule(t):
    max_step, lr = 31728, 0.01
    initial = [lr, 2 * lr, 10 * lr, 20 * lr]
    schedule = LearningRateSchedule("two_phase", initial, max_step)
    half = max_step / 2
    got = schedule.lrs_at(t)
    if t < half:
        expected = [base * (1 - t / half) ** 0.9 for base in initial]
    elif t < max_step:
        expected = [0.0007 * (1 - (t - half) / half) ** 0.9] * 4
    else:
        expected = None
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12)
    # Phase 1 (classification only) runs one update longer than the lr phase.
    assert schedule.classification_only(t) == (t <= half)


def test_apply_keeps_lr_after_max_step():
    optimizer = build_optimizer(_groups(), lr=1.0, weight_decay=0.0)
    schedule = LearningRateSchedule("poly", [1.0, 2.0, 10.0, 20.0], 4)
    schedule.apply(optimizer, 3)
    kept = [g["lr"] for g in optimizer.param_groups]
    schedule.apply(optimizer, 4)
    assert [g["lr"] for g in optimizer.param_groups] == kept == pytest.approx(
        [m * (1 - 3 / 4) ** 0.9 for m in (1, 2, 10, 20)])


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        LearningRateSchedule("cosine", [1.0], 10)
    with pytest.raises(ValueError, match="max_step must be >= 1"):
        LearningRateSchedule("poly", [1.0], 0)


@pytest.mark.parametrize("t", [0, 1, 299, 300, 301, 350, 399, 400])
def test_two_phase_schedule_with_cls_steps_and_seg_lr(t):
    max_step, cls_steps, lr, seg_lr = 400, 300, 0.01, 0.002
    initial = [lr, 2 * lr, 10 * lr, 20 * lr]
    schedule = LearningRateSchedule("two_phase", initial, max_step, cls_steps=cls_steps, seg_lr=seg_lr)
    got = schedule.lrs_at(t)
    if t < 300:  # phase 1: poly over the 300 classification updates
        assert got == pytest.approx([base * ((300 - t) / 300) ** 0.9 for base in initial], rel=1e-12)
    elif t < 400:  # phase 2: poly over the remaining 100 updates from seg_lr, every group alike
        assert got == pytest.approx([0.002 * ((400 - t) / 100) ** 0.9] * 4, rel=1e-12)
    else:
        assert got is None
    # classification only for updates t = 0..300 (t - 1 < 300), joint from t = 301
    assert schedule.classification_only(t) == (t in (0, 1, 299, 300))


def test_two_phase_defaults_are_the_released_half_and_lr():
    released = LearningRateSchedule("two_phase", [0.01] * 4, 100)
    assert released.cls_steps == 50 and released.seg_lr == 0.0007
    assert released.lrs_at(50) == pytest.approx([0.0007] * 4)


@pytest.mark.parametrize("kwargs, message", [({"cls_steps": 0}, "--cls_steps must be in 1..max_step-1 = 9, got 0"),
                                             ({"cls_steps": 10}, "--cls_steps must be in 1..max_step-1 = 9, got 10"),
                                             ({"seg_lr": 0.0}, "--seg_lr must be positive, got 0.0")])
def test_bad_cls_steps_and_seg_lr(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        LearningRateSchedule("two_phase", [1.0] * 4, 10, **kwargs)
