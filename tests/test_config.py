"""config.py: the flags' checks that run before anything is built (torch-free, so the launcher
refuses in a fraction of a second), and the preprocessing defaults."""
import os
import sys

import pytest

from config import ConfigError, parse_args
from conftest import data_flags, run_cli


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
    (["--mean", "0.5", "128", "0.5"], "--mean takes three values in [0, 1] (pixels scaled to 0-1), got [0.5, 128.0, 0.5]"),
    (["--std", "0.2", "0", "0.2"], "--std takes three values in (0, 1]"),
])
def test_impossible_preprocessing_is_refused_in_one_line(tiny_data, tmp_path, flags, message):
    result = run_cli([sys.executable, "launch_ddp.py", *data_flags(tiny_data, str(tmp_path), image_size=None), *flags],
                     check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "checkpoints")
