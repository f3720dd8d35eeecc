"""bench/vs_reference.py: the clean skip without torchvision's reference script (which this
repository does not hold), and, where one is given through VS_REFERENCE_TRAIN_PY (the path of a
references/classification/train.py with its presets.py, transforms.py and utils.py), a real quick
run of both programs.
"""
import os
import sys

import pytest
from conftest import REPO, run_cli

SCRIPT = os.path.join(REPO, "bench", "vs_reference.py")
RESULTS = os.path.join(REPO, "bench", "results")
REFERENCE = os.environ.get("VS_REFERENCE_TRAIN_PY")
ROWS = ["torchvision reference (train.py)", "project, JPEG files",
        "project, --cache_images (round 1's run builds the cache)"]


def run_bench(*flags, timeout=60):
    return run_cli([sys.executable, SCRIPT, "--quick", *flags], timeout=timeout)


def assert_skipped(result, results_dir, reason):
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("vs_reference: skipped: ") and reason in lines[0]
    assert "--reference PATH/TO/vision/references/classification/train.py" in lines[0]
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    assert not os.listdir(results_dir)  # nothing measured, no report


def test_skips_cleanly_without_a_reference(tmp_path):
    result = run_bench("--results_dir", str(tmp_path))
    assert_skipped(result, tmp_path, "no --reference given")


def test_skips_cleanly_when_the_reference_path_does_not_exist(tmp_path):
    missing = tmp_path / "vision" / "references" / "classification" / "train.py"
    out = tmp_path / "results"
    out.mkdir()
    result = run_bench("--reference", str(missing), "--results_dir", str(out))
    assert_skipped(result, out, f"{missing} does not exist")


def table(text, first_header):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE or not os.path.isfile(REFERENCE),
                    reason="set VS_REFERENCE_TRAIN_PY to torchvision's references/classification/train.py")
def test_quick_run_against_the_reference(tmp_path):
    before = {name: os.stat(os.path.join(RESULTS, name)).st_mtime_ns for name in os.listdir(RESULTS)}
    run_bench("--reference", REFERENCE, "--results_dir", str(tmp_path), timeout=280)
    after = {name: os.stat(os.path.join(RESULTS, name)).st_mtime_ns for name in os.listdir(RESULTS)}
    assert after == before, "a quick run rewrote bench/results/"
    text = (tmp_path / "vs_reference.md").read_text()
    rows = table(text, "run")
    assert [row[0] for row in rows] == ROWS
    for row in rows:
        wall, train, rest, images_per_second = (float(row[i]) for i in (1, 5, 6, 7))
        assert wall > 0 and train > 0 and images_per_second > 0
        assert abs(wall - train - rest) < 0.2  # the wall time splits into training and the rest
        assert 0 <= float(row[9]) <= 100  # final top-1 accuracy, %
    assert rows[0][3] == "1.00" and float(rows[1][3]) > 0 and float(rows[2][3]) > 0  # speed-ups
    assert "nccl -> gloo" in text and "--device cpu" in text  # the patches and the reference's flags are listed


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE or not os.path.isfile(REFERENCE),
                    reason="set VS_REFERENCE_TRAIN_PY to torchvision's references/classification/train.py")
def test_quick_v2_recipe_run_against_the_reference(tmp_path):
    run_bench("--reference", REFERENCE, "--recipe", "v2", "--results_dir", str(tmp_path), timeout=280)
    text = (tmp_path / "vs_reference_v2.md").read_text()
    rows = table(text, "run")
    assert [row[0] for row in rows] == ROWS
    for row in rows:
        assert float(row[7]) > 0  # training img/s
        assert 0 <= float(row[9]) <= 100 and 0 <= float(row[11]) <= 100  # final top-1 of the model and of its EMA
    # Both programs ran the v2 recipe in their own flags.
    for flag in ("--auto-augment ta_wide", "--ra-sampler --ra-reps 4", "--model-ema", "--random-erase 0.1",
                 "--auto_augment ta_wide", "--ra_reps 4", "--use_ema", "--random_erase 0.1", "--cutmix_alpha 1.0"):
        assert flag in text
