"""The modern recipe across input paths and sizes, on settled configurations (config.parse_args,
engine.training.settle) and the real builders (build_data, build_stage):
- a per-sample policy gives a sample the same model input on every input path: the file path
  (the policy in the loader's __getitems__, a stage without it), the raw and the JPEG image cache
  and --decode_on_device (the policy in the batch stage), within each path's documented resampling
  and JPEG differences, as the policy amplifies them;
- FixRes: training at --train_crop_size, evaluation, checkpoints, predict.py and export.py at the
  evaluation sizes; the image cache keyed by those;
- progressive resizing: the stage's size is a function of the epoch, so a run stopped in the
  middle of the ramp and resumed trains at the sizes the uninterrupted run does.
"""
import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, data_flags, make_tiny_data
from PIL import Image

import export
import predict
import train_ddp
from config import parse_args
from dataset import load_eval, normalize
from engine.batches import PROGRESSIVE_STEP, BatchStage, progressive_end_epoch, progressive_size
from engine.checkpoint import load_checkpoint
from engine.distributed import DistContext, StopRequest
from engine.training import build_data, build_stage, settle
from fastload.image_cache import CachedBatches
from inputs.policies import Policy
from model import model_from_checkpoint

CPU = DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
STORED = 32  # the sources' side and --val_resize_size: the cache stores every image as it is on disk
SIZES = ["--train_crop_size", "24", "--val_crop_size", "28", "--val_resize_size", str(STORED)]
EPOCHS = (1, 2)
POLICIES = {"ta_wide": ["--auto_augment", "ta_wide", "--random_erase", "0.5"], "ra": ["--auto_augment", "ra"]}
PATHS = {"files": [], "raw cache": ["--cache_images", "{cache}", "--cache_format", "raw"],
         "jpeg cache": ["--cache_images", "{cache}", "--cache_format", "jpeg"],
         "decode_on_device": ["--decode_on_device"]}
# --decode_on_device against the files: its crops are within 1 level of PIL's (test_batches.py,
# test_device_decode.py), on about 15% of the pixels here. Identity, geometry (nearest) and invert keep
# that difference; brightness, colour, contrast and sharpness (factors below 2) at most double it;
# posterize, solarize, equalize and autocontrast turn it into a large one only where a pixel sits at a
# threshold or bucket edge. So the mean stays below half a level and under 1% of the values move by
# more than 4 levels (measured on these images: 0.18-0.22 and 0.15-0.25%).
DEVICE_MEAN_LEVELS, DEVICE_FAR_FRACTION, FAR = 0.5, 0.01, 4
# The JPEG cache against the raw one: the stored images' own JPEG error, averaged by the crops'
# resampling and amplified as above. Mean at most 1.5x the stored error (measured: 0.8-0.95x), and
# under 1% of the values move by more than 16 levels (measured: 0.15-0.3%).
JPEG_MEAN_FACTOR, JPEG_FAR_FRACTION, JPEG_FAR = 1.5, 0.01, 16


def write_smooth_images(root, per_class, seed, classes=4, side=STORED):
    """Square PNGs of low-frequency waves (photo-like: JPEG keeps them within a few levels), with
    class k brighter in channel k % 3."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    for k in range(classes):
        os.makedirs(os.path.join(root, f"class{k}"))
        for i in range(per_class):
            waves = [0.5 + 0.25 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * x + rng.uniform(0, 2 * np.pi))
                     + 0.25 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * y + rng.uniform(0, 2 * np.pi)) for _ in range(3)]
            pixels = np.stack(waves, axis=-1)
            pixels[..., k % 3] = 0.3 + 0.7 * pixels[..., k % 3]
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(os.path.join(root, f"class{k}", f"{i}.png"))
    return root


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth")
    return dict(train_dir=write_smooth_images(str(root / "train"), per_class=8, seed=0),
                val_dir=write_smooth_images(str(root / "val"), per_class=2, seed=1), root=str(root))


def settled(data, *flags):
    """A run's settled configuration (settle) of tiny_cnn on `data`, with `flags`."""
    argv = ["--train_dir", data["train_dir"], "--val_dir", data["val_dir"], "--checkpoint_dir",
            f"{data['root']}/checkpoints", "--log_dir", f"{data['root']}/logs", "--model", "tiny_cnn",
            "--batch_size", "8", "--num_workers", "0", "--seed", "3", *flags]
    return settle(parse_args(argv), CPU)[0]


def staged_training(args):
    """{(epoch, sample key): model input} of EPOCHS through the run's loader and batch stage, as
    train_ddp's loop makes them; and the Data and stage that made them."""
    data = build_data(args, CPU)
    stage = build_stage(args, CPU, len(data.class_names), torch.contiguous_format)
    return stage_epochs(data.train_loader, stage), data, stage


def stage_epochs(loader, stage):
    inputs = {}
    for epoch in EPOCHS:
        loader.sampler.set_epoch(epoch)
        for images, labels, keys, _ in loader:
            for key, image in zip(keys.tolist(), stage.train_batch(images, labels, epoch, keys)[0]):
                inputs[(epoch, key)] = image
    return inputs


def level_differences(inputs, reference, args):
    """|inputs - reference| of each (epoch, key), in 0-255 levels (normalisation undone)."""
    assert inputs.keys() == reference.keys()
    levels = torch.tensor(args.std).view(3, 1, 1) * 255
    return torch.stack([(inputs[key] - reference[key]).abs() * levels for key in sorted(reference)])


@pytest.fixture(scope="module", params=list(POLICIES))
def by_path(request, smooth, tmp_path_factory):
    """Each input path's model inputs of the same run (policy request.param), and each path's pieces."""
    cache = str(tmp_path_factory.mktemp("cache"))
    runs = {}
    for path, flags in PATHS.items():
        args = settled(smooth, *SIZES, *POLICIES[request.param], *(flag.format(cache=cache) for flag in flags))
        runs[path] = (args, *staged_training(args))
    return runs


def test_the_file_path_augments_in_its_loader_and_every_other_path_in_the_batch_stage(by_path, smooth):
    args, inputs, data, stage = by_path["files"]
    assert stage.policy is None and data.train_loader.dataset.policy == Policy(args.auto_augment)
    for path in ("raw cache", "jpeg cache", "decode_on_device"):
        assert by_path[path][3].policy == Policy(args.auto_augment), path
    assert {image.shape for image in inputs.values()} == {(3, 24, 24)} and len(inputs) == 2 * 32
    # The policy is on: without it the files give other inputs to nearly every sample.
    plain = staged_training(settled(smooth, *SIZES))[0]
    per_sample = level_differences(inputs, plain, args).flatten(1).mean(1)
    assert (per_sample > 4).float().mean() > 0.75


def test_the_raw_cache_trains_on_the_file_paths_inputs_exactly(by_path):
    # The sources are stored as they are (square, --val_resize_size): on a CPU both paths crop the
    # same box of the same pixels with PIL, and the stage's policy is the workers' own function.
    files, raw = by_path["files"][1], by_path["raw cache"][1]
    assert files.keys() == raw.keys()
    for key in files:
        assert torch.equal(files[key], raw[key]), key


def test_decode_on_device_trains_on_the_file_paths_inputs_within_the_crops_rounding_as_the_policy_amplifies_it(
        by_path):
    args, files = by_path["files"][:2]
    differences = level_differences(by_path["decode_on_device"][1], files, args)
    assert differences.mean() < DEVICE_MEAN_LEVELS
    assert (differences > FAR).float().mean() < DEVICE_FAR_FRACTION
    # The bounds tell a sample apart from itself drawn for another epoch (other crop, other policy).
    other_epoch = {(epoch, key): files[(3 - epoch, key)] for epoch, key in files}
    mismatched = level_differences(other_epoch, files, args)
    assert mismatched.mean() > 20 * DEVICE_MEAN_LEVELS and (mismatched > FAR).float().mean() > 0.5


def test_the_jpeg_cache_trains_on_the_raw_caches_inputs_of_its_decoded_pixels_within_the_jpeg_error(by_path):
    args, jpeg, data = by_path["jpeg cache"][:3]
    stage = by_path["jpeg cache"][3]
    loader = data.train_loader
    decoded = np.stack([loader.images.decode(index) for index in range(len(loader.images))])
    # Exactly: the crops, policy and erasing of the raw cache's path applied to the decoded JPEGs.
    as_raw = CachedBatches(decoded, loader.labels.tolist(), loader.sampler, loader.batch_size, True,
                           loader.image_size, loader.device, loader.drop_last, loader.seed, loader.crop_scale,
                           loader.hflip_prob, loader.augment)
    from_decoded = stage_epochs(as_raw, stage)
    for key in jpeg:
        assert torch.equal(jpeg[key], from_decoded[key]), key
    # Against the raw cache: its JPEG error, amplified by the policy no more than a crop's rounding is.
    raw_stored = np.asarray(by_path["raw cache"][2].train_loader.images)
    stored_error = np.abs(decoded.astype(np.float64) - raw_stored).mean()
    differences = level_differences(jpeg, by_path["raw cache"][1], args)
    assert 0 < differences.mean() < JPEG_MEAN_FACTOR * stored_error
    assert (differences > JPEG_FAR).float().mean() < JPEG_FAR_FRACTION


# ------------------------------------------------------------------ FixRes: train small, evaluate large

def run_recording_shapes(argv, stop_at=None):
    """train_ddp.train in this process on `argv`, recording the shape of every model input the batch
    stage makes: [("train" or "eval", epoch or None, shape)]. With `stop_at` (epoch, batch), a stop
    request (what a SIGTERM records) arrives while that batch is staged. Returns (exit code, records)."""
    records, stop = [], None
    train_batch, eval_batch = BatchStage.train_batch, BatchStage.eval_batch

    def recording_train_batch(self, images, labels, epoch=1, keys=None):
        staged = train_batch(self, images, labels, epoch, keys)
        records.append(("train", epoch, tuple(staged[0].shape)))
        if stop_at == (epoch, sum(1 for kind, seen, _ in records if kind == "train" and seen == epoch)):
            stop.signal = signal.SIGTERM
        return staged

    def recording_eval_batch(self, images, labels):
        staged = eval_batch(self, images, labels)
        records.append(("eval", None, tuple(staged[0].shape)))
        return staged

    handlers = {signum: signal.getsignal(signum) for signum in StopRequest.SIGNALS}
    try:
        stop = StopRequest()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(BatchStage, "train_batch", recording_train_batch)
            patch.setattr(BatchStage, "eval_batch", recording_eval_batch)
            code = train_ddp.train(parse_args(argv), CPU, stop)
    finally:  # StopRequest installs its own handlers: the next tests get the ones they had
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return code, records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The conftest images (24 x 20): 24 for training, 8 for validation."""
    return make_tiny_data(str(tmp_path_factory.mktemp("tiny")))


def val_paths(data):
    """The validation images in the datasets' order (class folders, then files, sorted)."""
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(data["val_dir"]) for name in names)


@pytest.fixture(scope="module")
def fixres(tiny):
    """A one-epoch FixRes run: 16 px training crops, evaluation at 20 px of 24 px."""
    out = f"{tiny['root']}/fixres"
    code, records = run_recording_shapes(data_flags(tiny, out, image_size=None, model="tiny_cnn",
                                                    train_crop_size=16, val_crop_size=20, val_resize_size=24))
    assert code == 0
    return dict(records=records, checkpoint=f"{out}/checkpoints/checkpoint_best.pth")


def test_fixres_trains_on_train_crop_size_batches_and_validates_on_val_crop_size(fixres):
    shapes = {kind: {shape[1:] for recorded, _, shape in fixres["records"] if recorded == kind}
              for kind in ("train", "eval")}
    assert shapes == {"train": {(3, 16, 16)}, "eval": {(3, 20, 20)}}
    trained = sum(shape[0] for kind, _, shape in fixres["records"] if kind == "train")
    assert trained == 24  # the whole epoch
    checkpoint = load_checkpoint(fixres["checkpoint"])
    assert {key: checkpoint["preprocessing"][key] for key in ("image_size", "resize_size")} == dict(
        image_size=20, resize_size=24)
    assert (checkpoint["config"]["train_crop_size"], checkpoint["config"]["val_crop_size"]) == (16, 20)


def evaluated(paths, image_size, resize_size):
    """The images at `paths` as validation sees them at these sizes (load_eval): uint8 NCHW."""
    return torch.stack([torch.from_numpy(np.array(load_eval(path, image_size, resize_size))).permute(2, 0, 1)
                        for path in paths])


def model_outputs(checkpoint, paths, image_size, resize_size):
    """The checkpoint's model on `paths` evaluated at these sizes (load_eval, normalize): logits."""
    images = evaluated(paths, image_size, resize_size)
    with torch.no_grad():
        return model_from_checkpoint(checkpoint)(normalize(images, checkpoint["preprocessing"]["mean"],
                                                           checkpoint["preprocessing"]["std"]))


def test_predict_evaluates_at_the_checkpoints_evaluation_sizes(tiny, fixres, tmp_path, capsys):
    paths = val_paths(tiny)
    output = tmp_path / "predictions.json"
    assert predict.main(["--checkpoint", fixres["checkpoint"], tiny["val_dir"], "--topk", "3",
                         "--output", str(output)]) == 0
    capsys.readouterr()
    checkpoint = load_checkpoint(fixres["checkpoint"])
    classes = checkpoint["class_names"]
    predicted = {row["path"]: {p["class"]: p["probability"] for p in row["predictions"]}
                 for row in json.loads(output.read_text())}
    assert sorted(predicted) == paths
    expected = model_outputs(checkpoint, paths, 20, 24).softmax(dim=1)
    at_training_size = model_outputs(checkpoint, paths, 16, 24).softmax(dim=1)
    assert not torch.allclose(expected, at_training_size, atol=1e-4)  # the sizes matter to this model
    for path, probabilities in zip(paths, expected.tolist()):
        assert [predicted[path][name] for name in classes] == pytest.approx(probabilities, abs=1e-6), path


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_records_and_traces_the_evaluation_sizes(tiny, fixres, tmp_path, capsys):
    output = str(tmp_path / "model.pt")
    assert export.main(["--checkpoint", fixres["checkpoint"], "--format", "torchscript", "--output", output]) == 0
    capsys.readouterr()
    metadata = json.loads(open(output + ".json").read())
    assert (metadata["image_size"], metadata["resize_size"]) == (20, 24)
    assert "N x 3 x 20 x 20" in metadata["input"]
    paths = val_paths(tiny)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(output)(evaluated(paths, 20, 24)),
                                   model_outputs(load_checkpoint(fixres["checkpoint"]), paths, 20, 24),
                                   rtol=1e-4, atol=1e-4)


def test_the_image_cache_is_keyed_by_the_evaluation_sizes_and_not_by_the_training_crop(tiny, tmp_path, capsys):
    cache = str(tmp_path / "cache")

    def open_cache(train_crop, val_crop):
        """build_data on the cache at these crop sizes (of 24 px): (what it printed, the cache's files,
        the training batches' shapes, the evaluation batches)."""
        data = build_data(settled(tiny, "--cache_images", cache, "--train_crop_size", str(train_crop),
                                  "--val_crop_size", str(val_crop), "--val_resize_size", "24"), CPU)
        data.train_loader.sampler.set_epoch(1)
        shapes = {tuple(images.shape[1:]) for images, *_ in data.train_loader}
        evaluation = torch.cat([images for images, *_ in data.val_loader])
        return capsys.readouterr().out, set(os.listdir(cache)), shapes, evaluation

    printed, first_files, shapes, evaluation = open_cache(16, 20)
    assert printed.count("built in") == 2 and len(first_files) == 2  # the training and validation caches
    assert shapes == {(3, 16, 16)} and torch.equal(evaluation, evaluated(val_paths(tiny), 20, 24))
    printed, files, shapes, evaluation = open_cache(16, 16)
    assert printed.count("built in") == 2 and "reused" not in printed
    assert len(files) == 4 and first_files < files
    assert torch.equal(evaluation, evaluated(val_paths(tiny), 16, 24))
    printed, files, shapes, evaluation = open_cache(12, 20)
    assert printed.count("reused") == 2 and "built in" not in printed and len(files) == 4
    assert shapes == {(3, 12, 12)} and torch.equal(evaluation, evaluated(val_paths(tiny), 20, 24))


# ------------------------------------------------------------------ progressive resizing

@pytest.mark.parametrize("full, low, start, end", [(64, 16, 1, 4), (224, 128, 3, 20), (176, 100, 2, 3)])
def test_progressive_size_is_low_until_its_start_then_16_px_steps_below_the_line_to_full_size_from_its_end(
        full, low, start, end):
    for epoch in range(1, end + 3):
        size = progressive_size(epoch, full, low, start, end)
        if epoch <= start:
            assert size == low, epoch
        elif epoch >= end:
            assert size == full, epoch
        else:
            line = low + (epoch - start) / (end - start) * (full - low)
            assert size == low or size % PROGRESSIVE_STEP == 0, epoch
            assert low <= size <= line < size + PROGRESSIVE_STEP, epoch
        assert size >= progressive_size(epoch - 1, full, low, start, end)


def test_the_batch_stage_of_a_settled_run_trains_each_epoch_at_its_progressive_size(smooth):
    args = settled(smooth, "--train_crop_size", "64", "--val_crop_size", "64", "--progressive_min_size", "16",
                   "--epochs", "10")
    stage = build_stage(args, CPU, 4, torch.contiguous_format)
    end = progressive_end_epoch(10, 1)
    assert stage.progressive == (64, 16, 1, end) and end == 8  # the default end: round(0.85 x 10)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sizes = [stage.train_batch(images, torch.tensor([0, 1]), epoch, [0, 1])[0].shape[-1] for epoch in range(1, 11)]
    assert sizes == [progressive_size(epoch, 64, 16, 1, end) for epoch in range(1, 11)]
    assert sizes == [16, 16, 16, 32, 32, 48, 48, 64, 64, 64]


@pytest.mark.slow
def test_a_run_stopped_in_the_middle_of_the_ramp_resumes_at_the_sizes_of_the_uninterrupted_run(tiny):
    flags = dict(model="tiny_cnn", image_size=48, epochs=4, progressive_min_size=16, progressive_end_epoch=3,
                 limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
    sizes = {epoch: progressive_size(epoch, 48, 16, 1, 3) for epoch in range(1, 5)}
    assert sizes == {1: 16, 2: 32, 3: 48, 4: 48}  # the model sees the full size from the end epoch on
    code, uninterrupted = run_recording_shapes(data_flags(tiny, f"{tiny['root']}/progressive", **flags))
    assert code == 0
    trained = [(epoch, shape) for kind, epoch, shape in uninterrupted if kind == "train"]
    assert trained == [(epoch, (4, 3, sizes[epoch], sizes[epoch])) for epoch in range(1, 5) for _ in range(3)]

    argv = data_flags(tiny, f"{tiny['root']}/stopped", **flags)
    code, before = run_recording_shapes(argv, stop_at=(2, 2))
    assert code == 128 + signal.SIGTERM
    latest = f"{tiny['root']}/stopped/checkpoints/checkpoint_latest.pth"
    saved = load_checkpoint(latest)
    assert saved["epoch"] == 1 and saved["samples_done"] > 0  # inside epoch 2, half-way up the ramp
    code, after = run_recording_shapes(argv + ["--auto_resume"])
    assert code == 0
    assert [(epoch, shape) for kind, epoch, shape in before + after if kind == "train"] == trained
    assert_same_weights(load_checkpoint(latest)["model_state_dict"],
                        load_checkpoint(f"{tiny['root']}/progressive/checkpoints/checkpoint_latest.pth")
                        ["model_state_dict"])
