"""The two training scripts end to end on a tiny synthetic VOC set (CPU, width 0.0625, crop 64)."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import train_from_cls_weight
import train_from_init
from network import build_segnet
from tool.engine import build_parser, run_training
from test_engine import tiny_argv

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"^Iter:\s*(\d+)/\s*(\d+) Loss:\d+\.\d{4} imps:\d+\.\d Fin:.+ lr: \d\.\d{4}$")


def parse(script, argv):
    return build_parser(script.DEFAULTS).parse_args(argv)


def metrics(save_dir, session):
    with open(os.path.join(save_dir, f"{session}metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def no_dropout_segnet(name, width):
    model = build_segnet(name, width)
    for module in model.modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
            module.p = 0.0
    return model


@pytest.mark.parametrize("network, session, terms", [
    ("network.RRM", "RRM_", {"cls", "ce", "dense", "total"}),
    ("network.RRM(attention)", "RRM(attention)_", {"cls", "ce", "dense", "bcd", "total"}),
])
def test_cls_weight_script_trains_each_network(voc_root, tmp_path, network, session, terms):
    args = parse(train_from_cls_weight, tiny_argv(voc_root, tmp_path, "--network", network, "--max_step", "1",
                                                  "--log_every", "1"))
    result = run_training(args)
    # The released loop makes max_step + 1 updates; the last keeps the previous lr.
    assert result.steps_done == 2
    records = metrics(tmp_path, session)
    assert [r["step"] for r in records] == [0, 1]
    assert all(set(r) - {"step", "lr", "classification_only", "time"} == terms for r in records)
    base = 0.0007 if network == "network.RRM" else 0.001
    assert records[0]["lr"] == pytest.approx([base, 2 * base, 10 * base, 20 * base])
    assert records[1]["lr"] == records[0]["lr"]
    final = torch.load(result.final_weights, weights_only=True)
    initial = build_segnet(network, 0.0625).state_dict()
    assert result.final_weights == os.path.join(str(tmp_path), f"{session}final.pth")
    assert sorted(final) == sorted(initial)
    with open(tmp_path / f"{session}.log") as handle:
        lines = [m.groups() for m in map(LOG_LINE.match, handle.read().splitlines()) if m]
    assert lines == [("0", "1"), ("1", "1")]


@pytest.mark.parametrize("network", ["network.RRM", "network.RRM(attention)"])
def test_init_script_switches_phase_and_follows_the_two_phase_lr(voc_root, tmp_path, network):
    max_step = 6
    args = parse(train_from_init, tiny_argv(voc_root, tmp_path, "--network", network, "--max_step", str(max_step)))
    result = run_training(args)
    assert result.steps_done == max_step
    records = metrics(tmp_path, args.session_name)
    half = max_step / 2
    for t, record in enumerate(records):
        # Phase 1 (logits only) while t - 1 < max_step / 2: one update longer than the lr phase.
        assert record["classification_only"] == (t <= 3)
        assert ("ce" in record) == (t > 3)
        if t < half:
            expected = [m * 0.01 * (1 - t / half) ** 0.9 for m in (1, 2, 10, 20)]
        else:
            expected = [0.0007 * (1 - (t - half) / half) ** 0.9] * 4
        assert record["lr"] == pytest.approx(expected, rel=1e-9)


def test_init_script_max_step_from_epochs(voc_root, tmp_path):
    # 6 ids, batch 4 -> 1 step per epoch (drop_last), 2 epochs -> 2 updates.
    args = parse(train_from_init, tiny_argv(voc_root, tmp_path, "--batch_size", "4", "--max_epoches", "2"))
    assert run_training(args).max_step == 2


def test_resume_with_different_settings_is_refused(voc_root, tmp_path):
    first = run_training(parse(train_from_init, tiny_argv(voc_root, tmp_path, "--max_step", "4")), stop_after=1)
    args = parse(train_from_init, tiny_argv(voc_root, tmp_path, "--max_step", "5", "--resume", first.resume_checkpoint))
    with pytest.raises(ValueError, match="was written by a different run: max_step: checkpoint 4 vs now 5"):
        run_training(args)


def test_cli_entry_point(voc_root, tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "train_from_init.py"),
         *tiny_argv(voc_root, tmp_path, "--max_step", "1", "--session_name", "cli_")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert LOG_LINE.match(completed.stdout.splitlines()[0]) or any(
        LOG_LINE.match(line) for line in completed.stdout.splitlines())
    assert sorted(os.listdir(tmp_path)) == ["cli_.log", "cli_final.pth", "cli_final.pth.sha256", "cli_metrics.jsonl",
                                            "cli_resume.pt"]


DDP_DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    import train_from_init
    from test_train_scripts import no_dropout_segnet
    import tool.engine as engine
    args = engine.build_parser(train_from_init.DEFAULTS).parse_args(sys.argv[1:])
    engine.run_training(args, model_factory=no_dropout_segnet)
""")


def test_ddp_two_gloo_processes_match_one_process(voc_root, tmp_path):
    argv = ["--batch_size", "4", "--max_step", "4", "--seed", "3", "--region_quality"]
    single = run_training(parse(train_from_init, tiny_argv(voc_root, tmp_path / "single", *argv)),
                          model_factory=no_dropout_segnet)
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
         *tiny_argv(voc_root, tmp_path / "ddp", *argv)],
        cwd=tmp_path, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    ddp_records = metrics(tmp_path / "ddp", "RRM_")
    single_records = metrics(tmp_path / "single", "RRM_")
    # Only rank 0 writes: one record per step.
    assert [r["step"] for r in ddp_records] == [0, 1, 2, 3]
    # Steps 0-2 (classification) are exact, so the losses logged (mean over ranks) agree, including
    # step 3's classification loss, evaluated on the weights after step 2, and its dense energy (a sum / B).
    for ddp_record, single_record in zip(ddp_records, single_records):
        assert ddp_record["cls"] == pytest.approx(single_record["cls"], rel=1e-5, abs=1e-6)
    assert ddp_records[3]["dense"] == pytest.approx(single_records[3]["dense"], rel=1e-3)
    # Rank 0 logs the region counts summed over the ranks: the valid pixels depend on the data alone.
    summaries = []
    for run in ("ddp", "single"):
        with open(tmp_path / run / "RRM_region_quality.json") as handle:
            summaries.append(json.load(handle)["counts"])
    assert summaries[0][""][0] == summaries[1][""][0] == summaries[1]["cam_"][0] > 0
    assert ddp_records[3]["cam_precision"] == pytest.approx(single_records[3]["cam_precision"], abs=0.01)
    # Step 3's split CE is a mean over each process's valid pixels (not over the global batch), so the
    # final weights agree only up to that step's small seg-head update.
    ddp = torch.load(tmp_path / "ddp" / "RRM_final.pth", weights_only=True)
    reference = torch.load(single.final_weights, weights_only=True)
    assert sorted(ddp) == sorted(reference)
    for name, value in reference.items():
        torch.testing.assert_close(ddp[name], value, rtol=0, atol=1e-4, msg=name)
