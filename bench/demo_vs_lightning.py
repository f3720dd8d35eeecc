"""Demo vs Lightning: wall time from the command to 95% validation accuracy on the digits demo.

- project: `python launch_ddp.py --demo --num_gpus 1` (checkpoints and history to a temporary
  folder); the per-epoch summary lines give each epoch's validation accuracy;
- lightning: this script with --lightning_worker, a Lightning Trainer fed what train_ddp.py builds
  for the same flags: the data and loaders from training.build_data (the digits written by
  dataset.prepare_digits_demo, dataset.AugmentedImageFolder's per-sample seeded random resized
  crops, scale 0.5..1, no flip; epochs numbered from 1 as in the project, so the sample order and
  crops are the same), and the model, optimizer and schedule from training.build_training (the
  demo recipe of config.parse_args(["--demo"]): ResNet-18, 32 px, batch 32, AdamW lr 2e-3 weight
  decay 0.01 fused, cosine schedule with 20 linear warm-up steps stepped per optimizer step, 6
  epochs, 1 worker); drop_last, 2 sanity validation batches (both defaults), Lightning's default
  per-epoch checkpoint (the project also saves every epoch), no logger or progress bar; it prints
  each epoch's validation accuracy.

Both run as fresh processes, timed from process start until the output line of the first epoch
whose validation accuracy is >= the target (the line is printed when that epoch's validation
ends); the run is then stopped (SIGTERM to the launcher, which saves and exits cleanly) unless
--full. Runs alternate, project then Lightning, for each round. --quick: one round of one short
epoch (QUICK_FLAGS) each, which checks the script, not the time to the target.

    pip install -r bench/requirements.txt
    python bench/demo_vs_lightning.py [--quick] [--repeats N] [--full] [--target PERCENT] [--results_dir DIR]
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile

import common

PROJECT_LINE = r"Epoch (\d+)/\d+ \| train loss \S+ acc \S+% \| val loss \S+ acc ([\d.]+)%"
LIGHTNING_LINE = r"LIGHTNING epoch (\d+) val acc ([\d.]+)%"
DEMO_EPOCHS = 6
QUICK_FLAGS = ["--epochs", "1", "--limit_train_batches", "2", "--limit_val_batches", "1",  # train_ddp.py flags
               "--num_sanity_val_steps", "0"]


def lightning_worker(default_root_dir, train_flags):
    """Train the demo with a Lightning Trainer on what train_ddp.py builds for `train_flags`."""
    import logging
    import warnings

    import harness
    import lightning as L
    import torch
    import torch.nn.functional as F

    from config import parse_args
    from dataset import normalize
    from engine.training import build_data, settle

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    ctx = harness.one_process(torch.device("cpu"))
    args, _ = settle(parse_args(["--demo", "--checkpoint_dir", default_root_dir, "--log_dir", default_root_dir,
                                 "--gradient_accumulation_steps", "1", *train_flags]), ctx)
    data = build_data(args, ctx)
    training = harness.project_training(args, data, ctx)
    sampler = data.train_loader.sampler
    set_project_epoch = sampler.set_epoch
    # Lightning calls set_epoch(0, 1, ...); the project numbers epochs from 1. Shifted, both runs
    # see the same sample order and the same per-sample crops.
    sampler.set_epoch = lambda epoch: set_project_epoch(epoch + 1)
    sampler.set_epoch(0)  # Lightning creates the first epoch's iterator before it calls set_epoch

    class Demo(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = training.model
            self.correct = self.seen = 0

        def training_step(self, batch, batch_index):
            images, labels, *_ = batch
            return F.cross_entropy(self.model(normalize(images)), labels)

        def validation_step(self, batch, batch_index):
            images, labels, *_ = batch
            self.correct += (self.model(normalize(images)).argmax(1) == labels).sum().item()
            self.seen += labels.numel()

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                print(f"LIGHTNING epoch {self.current_epoch + 1} val acc {100 * self.correct / self.seen:.2f}%",
                      flush=True)
            self.correct = self.seen = 0

        def configure_optimizers(self):
            return {"optimizer": training.optimizer,
                    "lr_scheduler": {"scheduler": training.scheduler, "interval": "step"}}

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=default_root_dir,
                        accumulate_grad_batches=args.gradient_accumulation_steps,
                        limit_train_batches=args.limit_train_batches or 1.0,
                        limit_val_batches=args.limit_val_batches or 1.0,
                        num_sanity_val_steps=args.num_sanity_val_steps)
    trainer.fit(Demo(), data.train_loader, data.val_loader)


def timed_run(command, line_pattern, epochs, target, full, stop_signal):
    reached = lambda output: any(float(acc) >= target for _, acc in re.findall(line_pattern, output))  # noqa: E731
    patterns = [line_pattern.replace(r"(\d+)", str(epoch), 1) for epoch in range(1, epochs + 1)]
    run = common.run_timed(command, patterns=patterns, stop_when=None if full else reached, stop_signal=stop_signal)
    accs = [(int(e), float(a)) for e, a in re.findall(line_pattern, run["output"])]
    times = [run["seen"][p] for p in patterns if p in run["seen"]]
    hit = next((i for i, (_, acc) in enumerate(accs) if acc >= target), None)
    return dict(accs=accs, times=times, epoch=None if hit is None else accs[hit][0],
                seconds=None if hit is None else times[hit])


def run_rounds(args, rounds, train_flags):
    """{run name: [timed_run result per round]}, project and Lightning alternating."""
    scratch = tempfile.mkdtemp(prefix="bench-demo-")
    commands = {
        "project (launch_ddp.py --demo --num_gpus 1)": (
            [sys.executable, "launch_ddp.py", "--demo", "--num_gpus", "1", "--checkpoint_dir", f"{scratch}/ckpt",
             "--log_dir", f"{scratch}/logs", *train_flags], PROJECT_LINE, signal.SIGTERM),
        "lightning Trainer, same recipe": (
            [sys.executable, os.path.abspath(__file__), "--lightning_worker", f"{scratch}/lightning", *train_flags],
            LIGHTNING_LINE, None)}
    epochs = 1 if args.quick else DEMO_EPOCHS
    results = {name: [] for name in commands}
    try:
        for _ in range(rounds + (0 if args.quick else 1)):  # a warm-up round (page cache), dropped below
            for name, (command, pattern, stop_signal) in commands.items():
                results[name].append(timed_run(command, pattern, epochs, args.target, args.full, stop_signal))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {name: runs if args.quick else runs[1:] for name, runs in results.items()}


def report_rows(results):
    rows, base = [], None
    for name, runs in results.items():
        seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
        median = statistics.median(seconds) if len(seconds) == len(runs) else None
        base = base or median
        accs = "; ".join(" ".join(f"{acc:.1f}" for _, acc in r["accs"]) for r in runs)
        first_epoch = "; ".join(f"{r['times'][0]:.1f}" for r in runs if r["times"])
        per_epoch = "; ".join(f"{(r['times'][-1] - r['times'][0]) / (len(r['times']) - 1):.1f}"
                              for r in runs if len(r["times"]) > 1)
        rows.append([name, f"{median:.1f}" if median else "not reached in every run",
                     "; ".join(f"{s:.1f}" for s in seconds) or "-",
                     f"{median / base:.2f}" if median and base else "-",
                     ", ".join(str(r["epoch"]) for r in runs), first_epoch, per_epoch or "-", accs])
    return rows


def main():
    p = common.parser(__doc__, repeats=3)
    p.add_argument("--full", action="store_true", help="run every epoch instead of stopping at the target")
    p.add_argument("--target", type=float, default=95.0, help="validation accuracy to reach, in percent")
    # The worker's own folder, then the train_ddp.py flags both runs share.
    p.add_argument("--lightning_worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lightning_worker:
        return lightning_worker(args.lightning_worker[0], args.lightning_worker[1:])
    rounds = common.repeats(args)
    train_flags = QUICK_FLAGS if args.quick else []
    rows = report_rows(run_rounds(args, rounds, train_flags))
    body = common.table(["run", f"seconds to {args.target:g}% val acc (median)", "per run", "ratio to project",
                         "epoch reaching it, per run", "seconds to end of epoch 1, per run",
                         "seconds per later epoch, per run",
                         "val acc per epoch (%), per run"], rows)
    common.write_report(args.results_dir, "demo_vs_lightning",
                        f"Digits demo: time to {args.target:g}% validation accuracy, project vs Lightning", body, [
        f"{rounds} round(s){'' if args.quick else ' after 1 warm-up round'}, project and Lightning alternating; "
        "each run is a fresh process timed from its start (the project's includes launch_ddp.py and torchrun "
        "starting train_ddp.py: three Python start-ups).",
        "Same data, initial weights, sample order, crops, batch, optimizer, schedule and worker count, so the "
        "accuracy curves should agree closely; the time difference is then the per-epoch cost and start-up.",
        f"{'Every epoch run (--full).' if args.full else 'Runs are stopped once the target is reached.'}"
        + (f" --quick: train_ddp.py flags {' '.join(train_flags)} for both runs." if train_flags else "")])


if __name__ == "__main__":
    sys.exit(main())
