"""config.py: the flags' checks that run before anything is built (torch-free, so the launcher
refuses in a fraction of a second), and the preprocessing defaults."""
import json
import os
import sys

import pytest
from conftest import data_flags, run_cli, torchrun, train_cmd

from config import ConfigError, parse_args

# ------------------------------------------------------------------ --image_size the model can take

def test_launcher_refuses_an_image_size_the_model_cannot_take_without_importing_torch(tiny_data, tmp_path):
    code = ("import sys, launch_ddp; code = launch_ddp.main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules; sys.exit(code)")
    flags = data_flags(tiny_data, str(tmp_path / "run"), model="tiny_cnn", image_size=1)
    result = run_cli([sys.executable, "-c", code, *flags], check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: --image_size 1 is too small for tiny_cnn: its smallest input is 2 px; "
                             "use --image_size 2 or more\n")
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(ConfigError, match="too small for alexnet: its smallest input is 63 px"):
        parse_args(data_flags(tiny_data, str(tmp_path), model="alexnet", image_size=62))
    assert parse_args(data_flags(tiny_data, str(tmp_path), model="resnet18", image_size=1)).image_size == 1


# ------------------------------------------------------------------ preprocessing defaults

def test_preprocessing_defaults_are_the_torchvision_recipe_and_given_values_win(tiny_data, tmp_path):
    flags = data_flags(tiny_data, str(tmp_path), image_size=None)
    plain = parse_args(flags)
    assert (plain.image_size, plain.resize_size) == (224, 256)
    assert (plain.mean, plain.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert parse_args(flags + ["--image_size", "64"]).resize_size == 73  # 64 / 0.875, rounded
    given = parse_args(flags + ["--image_size", "64", "--resize_size", "64", "--mean", "0.5", "0.5", "0.5"])
    assert (given.resize_size, given.mean, given.std) == (64, [0.5, 0.5, 0.5], [0.229, 0.224, 0.225])
    with_weights = parse_args(flags + ["--pretrained"])  # the ranks fill them in from the weights' own
    assert (with_weights.image_size, with_weights.resize_size, with_weights.mean) == (None, None, None)


def test_preprocessing_values_come_from_a_config_file_too(tiny_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("mean: [0.5, 0.4, 0.3]\nstd: [0.2, 0.2, 0.2]\nresize_size: 300\n")
    args = parse_args(data_flags(tiny_data, str(tmp_path), image_size=None) + ["--config", str(config)])
    assert (args.mean, args.std, args.resize_size, args.image_size) == ([0.5, 0.4, 0.3], [0.2, 0.2, 0.2], 300, 224)
    config.write_text("mean: 0.5\n")
    with pytest.raises(ConfigError, match="key 'mean' = 0.5: expected a list of 3 numbers"):
        parse_args(data_flags(tiny_data, str(tmp_path)) + ["--config", str(config)])


@pytest.mark.parametrize("flags, message", [
    (["--image_size", "64", "--resize_size", "60"], "--resize_size 60 is smaller than --image_size 64"),
    (["--mean", "0.5", "128", "0.5"],
     "--mean takes three values in [0, 1] (pixels scaled to 0-1), got [0.5, 128.0, 0.5]"),
    (["--std", "0.2", "0", "0.2"], "--std takes three values in (0, 1]"),
])
def test_impossible_preprocessing_is_refused_in_one_line(tiny_data, tmp_path, flags, message):
    result = run_cli([sys.executable, "launch_ddp.py", *data_flags(tiny_data, str(tmp_path), image_size=None), *flags],
                     check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("flag, value", [("image_size", "0"), ("resize_size", "0"), ("image_size", "-3"),
                                         ("resize_size", "-1")])
def test_a_size_below_one_is_refused_in_one_line_not_replaced_by_the_default(tiny_data, tmp_path, flag, value):
    flags = [*data_flags(tiny_data, str(tmp_path / "run"), image_size=None), f"--{flag}", value]
    for command in ([sys.executable, "launch_ddp.py", *flags], train_cmd(*flags)):
        result = run_cli(command, check=False)
        assert result.returncode == 2, result.stdout
        assert result.stderr == f"error: --{flag} must be at least 1, got {value}\n"
        assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ the command line itself

@pytest.mark.parametrize("typo, meant", [("--lr_rate", "--learning_rate"), ("--learning-rate", "--learning_rate"),
                                         ("--epoch", "--epochs"), ("--batchsize", "--batch_size")])
def test_a_misspelt_flag_gets_one_line_naming_the_closest_flag(tiny_data, tmp_path, typo, meant):
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path / "run")), typo, "3"), check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: unrecognized argument {typo}; did you mean {meant}?\n"
    assert not os.path.exists(tmp_path / "run")


def test_the_launcher_suggests_its_own_flags_too_and_names_every_unknown_word(tiny_data, tmp_path):
    flags = data_flags(tiny_data, str(tmp_path / "run"))
    result = run_cli([sys.executable, "launch_ddp.py", "--num_gpu", "2", *flags], check=False)
    assert result.returncode == 2
    assert result.stderr == "error: unrecognized argument --num_gpu; did you mean --num_gpus?\n"
    result = run_cli([sys.executable, "launch_ddp.py", *flags, "--lr_rate=0.1", "--zzz"], check=False)
    assert result.returncode == 2
    assert result.stderr == ("error: unrecognized arguments --lr_rate (did you mean --learning_rate?), --zzz; "
                             "see --help for the flags\n")


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--amp_dtype", "fp16"], "argument --amp_dtype: invalid choice: 'fp16' (choose from 'auto', 'float16', "
                              "'bfloat16')"),
    (["--mean", "0.5"], "argument --mean: expected 3 arguments"),
])
def test_a_bad_flag_value_is_one_line_without_the_usage_text(tiny_data, tmp_path, flags, message):
    result = run_cli(train_cmd(*data_flags(tiny_data, str(tmp_path / "run")), *flags), check=False)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"error: {message}\n")


def test_help_states_each_default_once():
    text = " ".join(run_cli(train_cmd("--help")).stdout.split())  # argparse wraps lines at the terminal's width
    assert "(default: None)" not in text and "(default: False)" not in text
    # A help text that states its default gets no second one appended; plain defaults are still shown.
    assert "(default 1; on resume, whatever keeps the checkpoint's global batch) --max_grad_norm" in text
    assert "number of training epochs (default: 50)" in text and "(default: auto)" in text


def test_help_is_answered_before_torch_is_imported():
    code = ("import runpy, sys; sys.argv = ['train_ddp.py', '--help']\n"
            "try:\n    runpy.run_path('train_ddp.py', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0 and 'torch' not in sys.modules, sys.modules.keys()\n"
            "else:\n    raise AssertionError('--help did not exit')")
    result = run_cli([sys.executable, "-c", code])
    assert "--gradient_accumulation_steps" in result.stdout


# ------------------------------------------------------------------ --num_workers

def test_num_workers_defaults_to_the_cores_each_local_process_has_and_a_given_value_is_kept(tiny_data, tmp_path,
                                                                                           monkeypatch):
    cores = len(os.sched_getaffinity(0))
    for processes in (1, 2, 64):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))  # what torchrun tells each of its workers
        args = parse_args(data_flags(tiny_data, str(tmp_path), num_workers=None))
        assert args.num_workers == max(1, min(4, cores // processes))
        assert parse_args(data_flags(tiny_data, str(tmp_path), num_workers=3)).num_workers == 3


@pytest.mark.slow
def test_a_two_process_run_on_two_cores_starts_no_more_workers_than_cores(tiny_data, tmp_path):
    """torch's DataLoader warns when a process starts more workers than it has cores; the default
    (4 before) must fit two processes on two cores."""
    flags = data_flags(tiny_data, str(tmp_path), num_workers=None, model="tiny_cnn", batch_size=2)
    result = run_cli(["taskset", "-c", "0,1", *torchrun(2, *flags)], env={"OMP_NUM_THREADS": "1"})
    assert "worker processes in total" not in result.stdout + result.stderr
    with open(f"{tmp_path}/logs/config.json") as f:
        assert json.load(f)["num_workers"] == 1


# ------------------------------------------------------------------ the modern recipe's flags

def readme_recipe_command():
    """The README's translation of torchvision's ResNet-50 v2 command, as train_ddp.py's flags."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        text = f.read()
    block = text.split("<!-- torchvision-v2-recipe -->", 1)[1].split("```", 2)[1]
    words = block.replace("\\\n", " ").split()
    return words[words.index("train_ddp.py") + 1:]


def test_the_readme_translates_torchvisions_resnet50_v2_command_into_flags_that_parse(tmp_path):
    args = parse_args(readme_recipe_command() + ["--checkpoint_dir", str(tmp_path / "c"), "--log_dir",
                                                 str(tmp_path / "l")])
    expected = dict(model="resnet50", batch_size=128, optimizer="sgd", learning_rate=0.5, lr_scheduler="cosine",
                    lr_warmup_epochs=5, lr_warmup_method="linear", lr_warmup_decay=0.01, auto_augment="ta_wide",
                    epochs=600, random_erase=0.1, weight_decay=0.00002, norm_weight_decay=0.0, label_smoothing=0.1,
                    mixup_alpha=0.2, cutmix_alpha=1.0, train_crop_size=176, image_size=224, val_crop_size=224,
                    resize_size=232, val_resize_size=232, use_ema=True, ema_steps=32, ra_reps=4)
    assert {name: getattr(args, name) for name in expected} == expected


def test_image_size_is_the_shorthand_for_both_crops_and_the_specific_flags_win(tmp_path):
    out = ["--checkpoint_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l")]
    sizes = ("train_crop_size", "image_size", "resize_size", "val_crop_size", "val_resize_size")
    args = parse_args(["--image_size", "64", *out])
    assert [getattr(args, name) for name in sizes] == [64, 64, 73, 64, 73]
    args = parse_args(["--image_size", "64", "--train_crop_size", "48", "--val_resize_size", "80", *out])
    assert [getattr(args, name) for name in sizes] == [48, 64, 80, 64, 80]
    args = parse_args(["--train_crop_size", "176", "--val_crop_size", "224", "--val_resize_size", "232", *out])
    assert [getattr(args, name) for name in sizes] == [176, 224, 232, 224, 232]


@pytest.mark.parametrize("flags, message", [
    (["--mixup_alpha", "0.2", "--batch_size", "3"], "--batch_size must be even, got 3"),
    (["--cutmix_alpha", "1", "--skip_bad_images"], "drop --skip_bad_images"),
    (["--auto_augment", "ta_wide", "--no_augmentation"], "--no_augmentation trains without augmentation, but "
                                                         "--auto_augment asks for some"),
    (["--random_erase", "1.5"], "--random_erase must be in [0, 1], got 1.5"),
    (["--mix_prob", "-0.1"], "--mix_prob must be in [0, 1]"),
    (["--mixup_alpha", "-1"], "--mixup_alpha must be 0 or more"),
    (["--ra_reps", "0"], "--ra_reps must be at least 1"),
    (["--warmup_steps", "10", "--lr_warmup_epochs", "2"], "give one of them"),
    (["--lr_min", "0.1", "--learning_rate", "0.01"], "--lr_min 0.1 must be below --learning_rate 0.01"),
    (["--layer_decay", "1.5"], "--layer_decay must be in (0, 1]"),
    (["--nesterov"], "--nesterov is SGD's Nesterov momentum: it needs --optimizer sgd"),
    (["--progressive_min_size", "64", "--image_size", "64"], "--progressive_min_size 64 must be below the training "
                                                             "crop size 64"),
    (["--progressive_end_epoch", "4"], "--progressive_end_epoch needs --progressive_min_size"),
    (["--model", "alexnet", "--train_crop_size", "32", "--val_crop_size", "64"],
     "--train_crop_size 32 is too small for alexnet: its smallest input is 63 px"),
    (["--val_resize_size", "100", "--val_crop_size", "128"], "--resize_size 100 is smaller than --image_size 128"),
    (["--multi_label", "--train_csv", "a.csv", "--val_csv", "b.csv", "--tta", "flip"], "drop it with --multi_label"),
    (["--multi_label", "--train_csv", "a.csv", "--val_csv", "b.csv", "--label_delimiter", ""],
     "--label_delimiter must not be empty"),
    (["--multi_label"], "--multi_label reads each image's labels from CSV files"),
    (["--pos_weight", "balanced"], "--pos_weight is for --multi_label runs"),
])
def test_impossible_recipe_flags_are_refused_in_one_line_before_torch_loads(tiny_data, tmp_path, flags, message):
    result = run_cli([sys.executable, "launch_ddp.py", *data_flags(tiny_data, str(tmp_path), image_size=None), *flags],
                     check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "checkpoints")
