import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_weights, data_flags, load_weights, write_image_folder
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_ddp  # noqa: E402
from data_split import split_files  # noqa: E402


def write_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), color=(255, 0, 0)).save(path, format="PNG")


def make_dataset(root, counts):
    """counts: {class: number of .png images}."""
    for class_name, n in counts.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_png(root / class_name / f"img_{i:03d}.png")
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, "data_split.py", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def listing(split_dir):
    """{class: sorted relative file paths} for one output split folder."""
    if not split_dir.is_dir():
        return {}
    return {c.name: sorted(p.relative_to(c).as_posix() for p in c.rglob("*") if not p.is_dir())
            for c in sorted(split_dir.iterdir())}


def base_args(inp, out, *extra):
    return ["--input_dir", inp, "--output_dir", out, "--train_ratio", "0.8",
            "--val_ratio", "0.2", "--image_extensions", "png,jpg,jpeg", *extra]


# ---------------------------------------------------------------- split_files

def fake_files(counts):
    return {c: [f"{c}_{i}.png" for i in range(n)] for c, n in counts.items()}


def test_split_files_counts_and_partition():
    files = fake_files({"a": 10, "b": 7, "c": 2, "d": 1, "e": 20})
    splits = split_files(files, 0.7, 0.2, 0.1, seed=0)
    assert set(splits) == {"train", "val", "test"}
    # half-up rounding; tiny class "c" still gets a val image; "d" cannot.
    expected = {"a": (7, 2, 1), "b": (5, 1, 1), "c": (1, 1, 0), "d": (1, 0, 0),
                "e": (14, 4, 2)}
    for c, (n_train, n_val, n_test) in expected.items():
        assert (len(splits["train"][c]), len(splits["val"][c]),
                len(splits["test"][c])) == (n_train, n_val, n_test), c
        parts = [set(splits[s][c]) for s in ("train", "val", "test")]
        assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2])
        assert parts[1].isdisjoint(parts[2])
        assert parts[0] | parts[1] | parts[2] == set(files[c])


def test_split_files_no_test_key_when_ratio_zero():
    splits = split_files(fake_files({"a": 5}), 0.8, 0.2, 0.0, seed=1)
    assert set(splits) == {"train", "val"}
    assert (len(splits["train"]["a"]), len(splits["val"]["a"])) == (4, 1)


def test_split_files_deterministic_and_seed_sensitive():
    files = fake_files({"a": 50, "b": 30})
    first = split_files(files, 0.8, 0.2, 0.0, seed=42)
    # Input order must not matter, only the seed.
    shuffled = {c: list(reversed(f)) for c, f in files.items()}
    assert split_files(shuffled, 0.8, 0.2, 0.0, seed=42) == first
    assert split_files(files, 0.8, 0.2, 0.0, seed=43) != first


def test_split_files_classes_shuffled_independently():
    # Same file names in two classes must not get the same val picks.
    names = [f"{i}.png" for i in range(40)]
    splits = split_files({"a": names, "b": names}, 0.8, 0.2, 0.0, seed=0)
    assert splits["val"]["a"] != splits["val"]["b"]


def test_split_files_rejects_bad_ratios():
    with pytest.raises(ValueError):
        split_files(fake_files({"a": 3}), 0.5, 0.2, 0.0, seed=0)


# ---------------------------------------------------------------- CLI

def test_cli_copies_with_exact_counts(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"cat": 10, "dog": 5})
    out = tmp_path / "out"
    res = run_cli(*base_args(inp, out, "--test_ratio", "0.1", "--train_ratio", "0.7"))
    assert res.returncode == 0, res.stderr
    train, val, test = (listing(out / s) for s in ("train", "val", "test"))
    assert {c: len(f) for c, f in train.items()} == {"cat": 7, "dog": 3}
    assert {c: len(f) for c, f in val.items()} == {"cat": 2, "dog": 1}
    assert {c: len(f) for c, f in test.items()} == {"cat": 1, "dog": 1}
    for c in ("cat", "dog"):
        all_files = train[c] + val[c] + test[c]
        assert len(all_files) == len(set(all_files))  # disjoint
        assert set(all_files) == {p.name for p in (inp / c).iterdir()}  # complete
    copied = out / "train" / "cat" / train["cat"][0]
    assert not copied.is_symlink()
    assert copied.read_bytes() == (inp / "cat" / train["cat"][0]).read_bytes()
    # table with a totals row
    assert "TOTAL" in res.stdout and "cat" in res.stdout


def test_cli_no_test_dir_when_ratio_zero(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 5})
    out = tmp_path / "out"
    assert run_cli(*base_args(inp, out)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]


def test_cli_deterministic_across_runs(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 30, "b": 20})
    outs = {}
    for name, seed in (("x", 7), ("y", 7), ("z", 8)):
        res = run_cli(*base_args(inp, tmp_path / name, "--seed", seed))
        assert res.returncode == 0, res.stderr
        outs[name] = listing(tmp_path / name / "val")
    assert outs["x"] == outs["y"]
    assert outs["x"] != outs["z"]


def test_cli_extensions_case_insensitive_and_non_images_ignored(tmp_path):
    inp = tmp_path / "raw"
    write_png(inp / "a" / "one.png")
    write_png(inp / "a" / "two.JPG")   # PNG bytes, but only the name matters here
    write_png(inp / "a" / "sub" / "three.Jpeg")
    (inp / "a" / "notes.txt").write_text("not an image")
    (inp / "a" / "photo.gif").write_bytes(b"GIF89a")
    out = tmp_path / "out"
    res = run_cli("--input_dir", inp, "--output_dir", out, "--train_ratio", "0.8",
                  "--val_ratio", "0.2", "--image_extensions", ".PNG, jpg,jpeg")
    assert res.returncode == 0, res.stderr
    found = listing(out / "train").get("a", []) + listing(out / "val").get("a", [])
    assert sorted(found) == ["one.png", "sub/three.Jpeg", "two.JPG"]


def test_cli_refuses_a_class_that_would_get_no_val_image(tmp_path):
    # train_ddp.py refuses a val/ without one of train/'s classes: better now than after the copy.
    inp = make_dataset(tmp_path / "raw", {"big": 6, "lonely": 1})
    out = tmp_path / "out"
    assert_refused(run_cli(*base_args(inp, out)), "class 'lonely' has 1 image: 1 train and 0 val images")
    assert not out.exists()
    res = run_cli(*base_args(inp, out)[:-2], "--val_ratio", "0", "--train_ratio", "1", "--image_extensions", "png")
    assert res.returncode == 0, res.stderr  # without validation a class of one image is fine
    assert listing(out / "train")["lonely"] == ["img_000.png"]


@pytest.mark.parametrize("ratios", [(0.34, 0.33, 0.33), (0.1, 0.45, 0.45), (0.2, 0.8, 0.0), (0.5, 0.0, 0.5)])
def test_split_files_keeps_a_train_image_and_a_val_image_for_every_class(ratios):
    # 0.34/0.33/0.33 used to give a class of 2 images 1 val, 1 test and no train image.
    files = fake_files({f"c{n}": n for n in range(1, 9)})
    splits = split_files(files, *ratios, seed=3)
    for c, names in files.items():
        counts = {s: len(splits[s][c]) for s in splits}
        assert sum(counts.values()) == len(names) and counts["train"] >= 1, (c, counts)
        if ratios[1] > 0 and len(names) >= 2:
            assert counts["val"] >= 1, (c, counts)


def test_cli_two_image_class_with_thirds_gets_one_train_and_one_val_image(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"pair": 2, "many": 9})
    out = tmp_path / "out"
    res = run_cli("--input_dir", inp, "--output_dir", out, "--train_ratio", "0.34", "--val_ratio", "0.33",
                  "--test_ratio", "0.33", "--image_extensions", "png")
    assert res.returncode == 0, res.stderr
    assert {c: len(f) for c, f in listing(out / "train").items()} == {"many": 3, "pair": 1}
    assert {c: len(f) for c, f in listing(out / "val").items()} == {"many": 3, "pair": 1}
    assert listing(out / "test") == {"many": listing(out / "test")["many"]}  # no test image left for pair


def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_cli_failure_midway_leaves_nothing_and_a_rerun_works(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 6, "b": 6})
    os.symlink("/proc/self/mem", inp / "b" / "img_003x.png")  # a regular file whose read fails (EIO)
    out = tmp_path / "new" / "deeper" / "out"
    res = run_cli(*base_args(inp, out))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: failed while writing") and res.stderr.count("\n") == 1
    assert "nothing was written" in res.stderr
    assert not (tmp_path / "new").exists()  # nor the missing parents it created
    assert_nothing_written(tmp_path, out)
    os.remove(inp / "b" / "img_003x.png")
    assert run_cli(*base_args(inp, out)).returncode == 0  # the rerun is not refused
    assert len(list(out.rglob("*.png"))) == 12


def test_cli_sigterm_midway_leaves_nothing(tmp_path):
    png = (make_dataset(tmp_path / "raw", {"a": 1, "b": 1}) / "a" / "img_000.png").read_bytes()
    for class_name in ("a", "b"):
        for i in range(4000):
            (tmp_path / "raw" / class_name / f"{i:05d}.png").write_bytes(png)
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "data_split.py", *map(str, base_args(tmp_path / "raw", out))],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".out-partial")] and time.time() < deadline:
        time.sleep(0.005)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM, stderr
    assert stderr == "stopped by signal 15; nothing was written\n"
    assert_nothing_written(tmp_path, out)


def test_cli_skips_hidden_files_fifos_and_link_loops(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 3, "b": 3})
    write_png(inp / "a" / ".ipynb_checkpoints" / "img_000-checkpoint.png")
    write_png(inp / "a" / "._img_001.png")  # macOS AppleDouble file
    os.mkfifo(inp / "b" / "pipe.png")  # copying it would wait for a writer forever
    os.symlink(".", inp / "b" / "again")  # a loop
    os.symlink("../a", inp / "b" / "a_too")  # a real folder elsewhere: followed, once
    out = tmp_path / "out"
    res = run_cli(*base_args(inp, out))
    assert res.returncode == 0, res.stderr
    assert sorted(res.stderr.splitlines()) == [
        f"warning: skipping {inp / 'b' / 'again'}: it leads to {inp / 'b'}, which is already included "
        "(a link loop, or a second link to one folder)",
        f"warning: skipping {inp / 'b' / 'pipe.png'}: a FIFO (named pipe), not a regular file"]
    found = {c: sorted(listing(out / "train").get(c, []) + listing(out / "val").get(c, [])) for c in ("a", "b")}
    assert found == {"a": ["img_000.png", "img_001.png", "img_002.png"],
                     "b": ["a_too/img_000.png", "a_too/img_001.png", "a_too/img_002.png",
                           "img_000.png", "img_001.png", "img_002.png"]}


def test_cli_symlink_points_at_originals(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    out = tmp_path / "out"
    res = run_cli(*base_args(inp, out, "--symlink"))
    assert res.returncode == 0, res.stderr
    links = [p for p in out.rglob("*.png")]
    assert len(links) == 4
    for link in links:
        assert link.is_symlink()
        target = Path(os.readlink(link))
        assert target.is_absolute()
        assert target == (inp / "a" / link.name).resolve()


def test_cli_copy_and_symlink_are_exclusive(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    out = tmp_path / "out"
    res = run_cli(*base_args(inp, out, "--copy", "--symlink"))
    assert res.returncode == 2
    assert "not allowed with" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("ratios, message", [
    (("0.7", "0.2", "0.0"), "add up to 1"),
    (("0.9", "0.2", "-0.1"), "must be >= 0"),
    (("0.0", "1.0", "0.0"), "train_ratio must be > 0"),
    (("nan", "0.2", "0.0"), "must be >= 0"),
])
def test_cli_refuses_bad_ratios(tmp_path, ratios, message):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    out = tmp_path / "out"
    train, val, test = ratios
    res = run_cli("--input_dir", inp, "--output_dir", out, "--train_ratio", train,
                  "--val_ratio", val, "--test_ratio", test, "--image_extensions", "png")
    assert_refused(res, message, out)


def assert_refused(res, message, out=None):
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0]
    assert "Traceback" not in res.stderr
    if out is not None:
        assert not out.exists() or not any(out.rglob("*.png"))


def test_cli_refuses_missing_input(tmp_path):
    out = tmp_path / "out"
    assert_refused(run_cli(*base_args(tmp_path / "nope", out)), "does not exist", out)
    assert not out.exists()


def test_cli_refuses_input_without_class_folders(tmp_path):
    inp = tmp_path / "raw"
    write_png(inp / "loose.png")  # image not inside a class folder
    out = tmp_path / "out"
    assert_refused(run_cli(*base_args(inp, out)), "no class sub-folders", out)
    assert not out.exists()


def test_cli_refuses_when_no_matching_images(tmp_path):
    inp = tmp_path / "raw"
    (inp / "a").mkdir(parents=True)
    (inp / "a" / "readme.txt").write_text("hi")
    out = tmp_path / "out"
    assert_refused(run_cli(*base_args(inp, out)), "no files with extensions", out)
    assert not out.exists()


@pytest.mark.parametrize("where", ["same", "inside", "inside_via_dotdot"])
def test_cli_refuses_output_in_input(tmp_path, where):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    out = {"same": inp, "inside": inp / "split",
           "inside_via_dotdot": tmp_path / "other" / ".." / "raw" / "split"}[where]
    before = sorted(inp.rglob("*"))
    assert_refused(run_cli(*base_args(inp, out)), "inside it")
    assert sorted(inp.rglob("*")) == before  # nothing written into the input


def test_cli_refuses_output_in_input_via_symlink(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    alias = tmp_path / "alias"
    alias.symlink_to(inp)
    before = sorted(inp.rglob("*"))
    assert_refused(run_cli(*base_args(inp, alias / "split")), "inside it")
    assert sorted(inp.rglob("*")) == before  # nothing written into the input


@pytest.mark.parametrize("split", ["train", "val"])
def test_cli_refuses_non_empty_output(tmp_path, split):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    out = tmp_path / "out"
    (out / split / "old").mkdir(parents=True)
    (out / split / "old" / "stale.txt").write_text("x")
    res = run_cli(*base_args(inp, out))
    assert_refused(res, "pick an empty --output_dir", out)
    assert sorted(p.name for p in out.rglob("*")) == ["old", "stale.txt", split]


def test_cli_accepts_existing_empty_output_dirs(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "val").mkdir()
    assert run_cli(*base_args(inp, out)).returncode == 0
    assert len(list(out.rglob("*.png"))) == 4


# ---------------------------------------------------------------- --write_csv

def read_rows(path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.reader(file))


def test_cli_write_csv_lists_each_split_as_the_copied_folders_hold_it(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"cat": 10, "dog": 5, "odd, name": 4})
    (inp / "dog" / "sub").mkdir()
    write_png(inp / "dog" / "sub" / "deep.png")
    extra = ("--test_ratio", "0.1", "--train_ratio", "0.7")
    assert run_cli(*base_args(inp, tmp_path / "copied", *extra)).returncode == 0
    res = run_cli(*base_args(inp, tmp_path / "csv", *extra, "--write_csv"))
    assert res.returncode == 0, res.stderr
    out = (tmp_path / "csv").resolve()
    assert sorted(p.name for p in out.iterdir()) == ["test.csv", "train.csv", "val.csv"]  # and nothing copied
    for split in ("train", "val", "test"):
        copied = listing(tmp_path / "copied" / split)
        assert read_rows(out / f"{split}.csv") == [["image", "label"]] + [
            [f"{class_name}/{rel}", class_name] for class_name in sorted(copied) for rel in copied[class_name]]
    assert (f"wrote train.csv, val.csv, test.csv into {out} (seed 42), image paths relative to {inp.resolve()}; "
            f"train with: --train_csv {out}/train.csv --val_csv {out}/val.csv --image_root {inp.resolve()}\n"
            in res.stdout)


def test_cli_write_csv_into_the_input_folder_needs_no_image_root(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 5, "b": 5})
    res = run_cli(*base_args(inp, inp, "--write_csv"))
    assert res.returncode == 0, res.stderr
    assert f"train with: --train_csv {inp}/train.csv --val_csv {inp}/val.csv\n" in res.stdout
    assert sorted(p.name for p in inp.iterdir()) == ["a", "b", "train.csv", "val.csv"]


def test_cli_write_csv_refuses_an_output_inside_the_input_existing_label_files_and_copy(tmp_path):
    inp = make_dataset(tmp_path / "raw", {"a": 4})
    assert_refused(run_cli(*base_args(inp, inp / "splits", "--write_csv")),
                   f"--output_dir {inp}/splits is inside the input dir; write the label files outside it, or into "
                   "--input_dir itself")
    out = tmp_path / "out"
    out.mkdir()
    (out / "val.csv").write_text("mine\n")
    assert_refused(run_cli(*base_args(inp, out, "--write_csv")),
                   f"{out}/val.csv already exists; remove it or pick another --output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["val.csv"] and (out / "val.csv").read_text() == "mine\n"
    assert "not allowed with" in run_cli(*base_args(inp, out, "--copy", "--write_csv")).stderr


def test_cli_write_csv_output_trains_as_the_copied_split_does(tmp_path):
    inp = tmp_path / "raw images"  # the printed flags are quoted for a shell
    write_image_folder(str(inp), per_class=6)
    assert run_cli(*base_args(inp, tmp_path / "copied", "--train_ratio", "0.5", "--val_ratio", "0.5")).returncode == 0
    res = run_cli(*base_args(inp, tmp_path / "csv", "--train_ratio", "0.5", "--val_ratio", "0.5", "--write_csv"))
    flags = shlex.split(res.stdout.split("train with: ")[1].splitlines()[0])
    common = dict(model="tiny_cnn", batch_size=3, limit_train_batches=3, num_sanity_val_steps=0)
    copied = dict(train_dir=f"{tmp_path}/copied/train", val_dir=f"{tmp_path}/copied/val")
    assert train_ddp.main(data_flags(copied, f"{tmp_path}/run_copied", **common)) == 0
    assert train_ddp.main(data_flags(dict(train_dir=None, val_dir=None), f"{tmp_path}/run_csv", **common) + flags) == 0
    assert_same_weights(load_weights(f"{tmp_path}/run_copied/checkpoints/checkpoint_latest.pth"),
                        load_weights(f"{tmp_path}/run_csv/checkpoints/checkpoint_latest.pth"), exact=True)
