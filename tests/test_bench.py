"""Every bench/ script, run for real in its smallest mode (--quick), so bench/ cannot rot.

Reports go to tmp_path (--results_dir): the committed bench/results/ must stay untouched.
Marked slow: deselect with `-m "not slow"` (about two minutes on 2 cores).
"""
import os
import re
import sys

import pytest
import torch
from conftest import REPO, run_cli

from fastload import readahead

pytestmark = pytest.mark.slow

RESULTS = os.path.join(REPO, "bench", "results")


def committed_reports():
    return {name: os.stat(os.path.join(RESULTS, name)).st_mtime_ns for name in sorted(os.listdir(RESULTS))}


def run_bench(script, *flags):
    """Run bench/<script> with --quick; fail if it touched the committed reports. Returns stdout.

    One intra-op thread: these runs check the scripts, not their speed, and on a busy 2-core
    machine torch's spinning OpenMP threads about double their CPU time."""
    before = committed_reports()
    result = run_cli([sys.executable, os.path.join("bench", script), "--quick", *flags], timeout=280,
                     env={"OMP_NUM_THREADS": "1"})
    assert committed_reports() == before, "a quick run rewrote bench/results/"
    return result.stdout


def table(text, first_header):
    """The rows (lists of cells) of the Markdown table whose header's first cell is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:  # past the header and the | --- | line
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def number(cell):
    return float(cell.replace(",", "").rstrip("%"))


def report(results_dir, name):
    path = results_dir / f"{name}.md"
    assert path.is_file(), f"no report {path}"
    return path.read_text()


def test_bench_step_efficiency(tmp_path):
    run_bench("step_efficiency.py", "--results_dir", str(tmp_path))
    rows = table(report(tmp_path, "step_efficiency"), "workload")
    loops = ["bare", "project", "project --channels_last", "lightning", "lightning, whole fit()"]
    assert [row[1] for row in rows] == loops * 2
    assert {row[0] for row in rows} == {"resnet18 32px b16", "tiny_cnn 32px b16"}
    assert all(number(row[2]) > 0 and number(row[3]) > 0 for row in rows)
    assert all(row[3] == "1.000" for row in rows if row[1] == "bare")


def test_bench_demo_vs_lightning(tmp_path):
    # Target 0%: both runs reach it at their first epoch, so the stop-at-target path runs too.
    run_bench("demo_vs_lightning.py", "--target", "0", "--results_dir", str(tmp_path))
    text = report(tmp_path, "demo_vs_lightning")
    rows = table(text, "run")
    assert [row[0] for row in rows] == ["project (launch_ddp.py --demo --num_gpus 1)", "lightning Trainer, same recipe"]
    for row in rows:
        assert number(row[1]) > 0 and row[4] == "1"  # seconds to the target, reached at epoch 1
        assert 0 <= number(row[7]) <= 100  # the epoch's validation accuracy
    assert number(rows[0][3]) == 1.0
    assert "--epochs 1" in text


def test_bench_end_to_end(tmp_path):
    run_bench("end_to_end.py", "--results_dir", str(tmp_path))
    text = report(tmp_path, "end_to_end")
    rows = table(text, "path")
    assert [row[0] for row in rows] == ["(a) CLI, files, 2 workers", "(b) CLI, --cache_images",
                                        "(b2) CLI, --cache_images --cache_format jpeg",
                                        "(c) in-memory, batched crops", "(c0) in-memory, center crop",
                                        "(d) bare loop, pre-cropped in-memory tensors"]
    assert all(number(row[1]) > 0 for row in rows)
    first_step = table(text.split("Time from command to the first training step")[1], "path")
    assert len(first_step) == 2
    assert all(0 < number(row[1]) <= number(row[3]) for row in first_step)  # loop start, then exit
    saves = table(text, "epoch of")
    assert len(saves) == 2 and all(number(row[1]) > 0 and number(row[2]) > 0 for row in saves)


def test_bench_input_pipeline(tmp_path):
    photos = str(tmp_path / "photos")
    run_bench("input_pipeline.py", "--data", photos, "--results_dir", str(tmp_path))
    text = report(tmp_path, "input_pipeline")
    rows = table(text, "image size")
    assert len(rows) == 2 * 2 * 5  # image sizes x worker groups x paths ((d) and (e) listed in both groups)
    assert {row[0] for row in rows} == {"224", "64"}
    assert all(number(row[4]) > 0 for row in rows)
    builds = table(text.split("One-time cache build")[1], "image size")
    assert [row[:2] for row in builds] == [["224", "raw"], ["224", "jpeg"], ["64", "raw"], ["64", "jpeg"]]
    assert all(number(row[3]) > 0 for row in builds) and all(0 < number(row[4]) < 1 for row in builds[1::2])
    run_bench("input_pipeline.py", "--profile", "--data", photos, "--results_dir", str(tmp_path))
    stages = table(report(tmp_path, "input_pipeline_profile"), "image size")
    assert len(stages) == 5 + 2 * 10  # decodes, then 10 stages per image size
    assert all(number(row[2]) > 0 for row in stages[:5]) and all(number(row[2]) >= 0 for row in stages)


def test_bench_processes(tmp_path):
    run_bench("processes.py", "--results_dir", str(tmp_path))
    text = report(tmp_path, "processes")
    rows = table(text, "model")
    assert [row[1] for row in rows] == ["1 process", "2 processes, accumulation 4"]
    assert all(number(row[2]) > 0 for row in rows)
    all_reduce = table(text.split("Gradient all-reduce measured directly")[1], "model")
    assert [row[0] for row in all_reduce] == ["tiny_cnn", "resnet18"]
    assert all(number(row[3]) > 0 for row in all_reduce)
    saved = table(text.split("All-reduces per process and epoch")[1], "model")
    assert [row[1:5] for row in saved] == [["4", "4", "1", "3"]] * 2  # 64 images per process, batch 16


def test_bench_gpu_quick_runs_its_configurations(tmp_path):
    out = run_bench("gpu.py", "--data", str(tmp_path / "photos"))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(("| synthetic", "| JPEG", "| compressed"))]
    labels = [row[0] for row in rows]
    assert labels[:6] == ["synthetic, fp32", "synthetic, fp32, channels_last", "synthetic, fp16",
                          "synthetic, fp16, channels_last", "synthetic, bf16", "synthetic, bf16, channels_last"]
    assert len(rows) == 6 + 8  # then the raw and compressed caches, files, files decoded on the device: loader
    assert all(number(row[1]) > 0 for row in rows)  # alone, and training
    assert re.search(r"Ratios to synthetic \(.*\): cache [\d.]+, compressed cache [\d.]+, files [\d.]+, files "
                     r"decoded on the device [\d.]+", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_gpu_without_cuda_exits_with_one_line():
    result = run_cli([sys.executable, os.path.join("bench", "gpu.py")], check=False, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no CUDA device" in result.stderr


def test_bench_profile_cache_gpu_quick_runs_every_mode(tmp_path):
    out = run_bench("profile_cache_gpu.py", "--data", str(tmp_path / "photos"), "kernels", "crop", "sweep", "epochs")
    assert [line for line in out.splitlines() if line.startswith("== ")] == [
        "== kernels", "== crop", "== sweep", "== epochs"]
    rates = re.findall(r"^(.+): ([\d,]+) images/s$", out, flags=re.MULTILINE)
    assert [label for label, _ in rates] == [
        "epoch under the profiler", "synthetic", "cache, 2 reader threads", "cache, 4 reader threads",
        "cache, 8 reader threads", f"cache, {readahead.READER_THREADS} reader threads, no augmentation",
        "epoch 0", "epoch 1"]
    assert all(number(rate) > 0 for _, rate in rates)
    timed = re.findall(r"^(host: draw_crops|copy to cpu|copy to cuda|crop_and_flip).*: ([\d.]+) ms per batch$", out,
                       flags=re.MULTILINE)
    assert [name for name, _ in timed] == ["host: draw_crops", "copy to cpu", "crop_and_flip"]
    assert all(float(ms) > 0 for _, ms in timed)


def test_bench_crop_draws(tmp_path):
    run_bench("crop_draws.py", "--results_dir", str(tmp_path))
    rows = table(report(tmp_path, "crop_draws"), "way")
    assert [row[0][:3] for row in rows] == ["(a)", "(b)", "(c)", "(d)"]
    assert all(number(row[1]) > 0 and number(row[2]) > 0 for row in rows)
    assert rows[0][3] == "1.00"  # (a) is the baseline of the speed-ups


def test_bench_cpu_allocator(tmp_path):
    run_bench("cpu_allocator.py", "--results_dir", str(tmp_path))
    rows = table(report(tmp_path, "cpu_allocator"), "measure")
    assert [row[0] for row in rows] == ["normalize, ms per call (lower is better)",
                                        "training tiny_cnn 32px b16, images/s", "peak resident memory, MiB",
                                        "page faults, whole process"]
    assert all(number(row[1]) > 0 and number(row[2]) > 0 for row in rows)


def test_bench_joint_checks(tmp_path):
    run_bench("joint_checks.py", "--results_dir", str(tmp_path))
    text = report(tmp_path, "joint_checks")
    microseconds = float(re.search(r"One joint check \(2 gloo processes\): median (\d+) µs per call", text).group(1))
    assert 0 < microseconds < 1e6
    rows = table(text, "workload")
    assert [row[1] for row in rows] == ["every 0.25 s (default)", "every step"]
    assert all(row[0] == "tiny_cnn 32px b16 x 2 processes" and number(row[2]) > 0 and number(row[3]) > 0
               for row in rows)
    assert number(rows[0][4]) == 1.0


def test_bench_finetune(tmp_path):
    run_bench("finetune.py", "--results_dir", str(tmp_path))
    rows = table(report(tmp_path, "finetune"), "configuration")
    assert [row[0] for row in rows] == ["full training", "frozen backbone", "AMP bfloat16", "frozen + AMP bfloat16"]
    assert all(number(row[1]) > 0 and number(row[4]) > 100 for row in rows)  # images/s, peak RSS in MiB
    assert number(rows[0][2]) == 1.0 and number(rows[0][5]) == 1.0


def test_bench_recipe_costs(tmp_path):
    run_bench("recipe_costs.py", "--results_dir", str(tmp_path))
    text = report(tmp_path, "recipe_costs")
    parts = table(text, "part")
    policies = ["TrivialAugment-wide (ta_wide)", "RandAugment (ra, 2 ops, magnitude 9)", "AugMix (augmix, severity 3)",
                "AutoAugment imagenet (imagenet)", "colour jitter 0.4"]
    float_steps = ["random erasing p=0.1 (erase_batch, float batch)",
                   "mixup 0.2 / cutmix 1.0 (draw_pairs + mix_batch, float batch)"]
    assert [row[0] for row in parts] == [
        "crop alone (draw_crops + crop_and_flip from stored images)", *policies, *float_steps,
        "progressive resize 32 -> 23 px (uint8, antialiased)", "normalisation (dataset.normalize)",
        "whole v2 stage: ta_wide, normalise, erase, mix (BatchStage.train_batch)"]
    for row in parts:  # the worker side times the crop and the policies only
        assert (row[1] != "-") == (row[0] in policies or row[0].startswith("crop"))
        assert number(row[3]) > 0 and number(row[5]) > 0
    versus = table(text.split("against torchvision's v2 transforms")[1], "part")
    assert [row[0] for row in versus] == policies + float_steps
    assert all(number(row[1]) > 0 and number(row[2]) > 0 and number(row[3]) > 0 for row in versus)
    assert "Batch of 8 images, 32 px crops" in text
