"""Demo vs Lightning: wall time from the command to 95% validation accuracy on the digits demo.

- project: `python launch_ddp.py --demo --num_gpus 1` (checkpoints and history to a temporary
  folder); the per-epoch summary lines give each epoch's validation accuracy;
- lightning: this script with --lightning_worker, a Lightning Trainer with the same recipe: the
  demo flags from config.parse_args(["--demo"]) (ResNet-18 from model.build_model, 32 px, batch
  32, AdamW lr 2e-3 weight decay 0.01 fused, cosine schedule with 20 linear warm-up steps stepped
  per optimizer step via recipe.build_scheduler, 6 epochs, 1 worker), the same data
  (dataset.prepare_digits_demo) and transforms (dataset.AugmentedImageFolder: per-sample seeded
  random resized crop, scale 0.5..1, no flip; epochs numbered from 1 as in the project, so the
  sample order and crops are the same), drop_last, 2 sanity validation batches (both
  defaults), Lightning's default per-epoch checkpoint (the project also saves every epoch), no
  logger or progress bar; it prints each epoch's validation accuracy.

Both run as fresh processes, timed from process start until the output line of the first epoch
whose validation accuracy is >= 95% (the line is printed when that epoch's validation ends); the
run is then stopped (SIGTERM to the launcher, which saves and exits cleanly) unless --full.
Runs alternate, project then Lightning, for each round.

    pip install -r bench/requirements.txt
    python bench/demo_vs_lightning.py [--quick] [--repeats N] [--full]
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

TARGET = 95.0
PROJECT_LINE = r"Epoch (\d+)/\d+ \| train loss \S+ acc \S+% \| val loss \S+ acc ([\d.]+)%"
LIGHTNING_LINE = r"LIGHTNING epoch (\d+) val acc ([\d.]+)%"


def lightning_worker(default_root_dir):
    import logging
    import warnings

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import harness  # noqa: F401  (puts the repository on sys.path)
    from config import parse_args
    from dataset import EpochTaggedSampler, build_datasets, normalize, prepare_digits_demo
    from model import build_model
    from recipe import build_scheduler

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    args = parse_args(["--demo", "--checkpoint_dir", default_root_dir, "--log_dir", default_root_dir])
    args.train_dir, args.val_dir = prepare_digits_demo(os.path.dirname(args.train_dir))
    train_set, val_set, class_names = build_datasets(args)
    class OneBasedEpochs(EpochTaggedSampler):
        """Lightning calls set_epoch(0, 1, ...); the project numbers epochs from 1. Shifted, both runs
        see the same sample order and the same per-sample crops."""
        def set_epoch(self, epoch, start=0):
            super().set_epoch(epoch + 1, start)

    sampler = OneBasedEpochs(train_set, num_replicas=1, rank=0, seed=args.seed)  # (epoch, index) keys
    sampler.set_epoch(0)  # Lightning creates the first epoch's iterator before it calls set_epoch
    common_kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, persistent_workers=True)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **common_kw)
    val_loader = DataLoader(val_set, shuffle=False, **common_kw)

    class Demo(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(args.seed)
            self.model = build_model(args.model, len(class_names))
            self.correct = self.seen = 0

        def training_step(self, batch, batch_index):
            images, labels, _ = batch
            return F.cross_entropy(self.model(normalize(images)), labels)

        def validation_step(self, batch, batch_index):
            images, labels, _ = batch
            self.correct += (self.model(normalize(images)).argmax(1) == labels).sum().item()
            self.seen += labels.numel()

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                print(f"LIGHTNING epoch {self.current_epoch + 1} val acc {100 * self.correct / self.seen:.2f}%",
                      flush=True)
            self.correct = self.seen = 0

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                          fused=True)
            scheduler = build_scheduler(optimizer, args, len(train_loader))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=default_root_dir)
    trainer.fit(Demo(), train_loader, val_loader)


def timed_run(command, line_pattern, full, stop_signal):
    reached = lambda output: any(float(acc) >= TARGET for _, acc in re.findall(line_pattern, output))  # noqa: E731
    patterns = [line_pattern.replace(r"(\d+)", str(epoch), 1) for epoch in range(1, 7)]
    run = common.run_timed(command, patterns=patterns, stop_when=None if full else reached, stop_signal=stop_signal)
    accs = [(int(e), float(a)) for e, a in re.findall(line_pattern, run["output"])]
    times = [run["seen"][p] for p in patterns if p in run["seen"]]
    hit = next((i for i, (_, acc) in enumerate(accs) if acc >= TARGET), None)
    return dict(accs=accs, times=times, epoch=None if hit is None else accs[hit][0],
                seconds=None if hit is None else times[hit])


def main():
    p = common.parser(__doc__, repeats=3)
    p.add_argument("--full", action="store_true", help="run all 6 epochs instead of stopping at the target")
    p.add_argument("--lightning_worker", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lightning_worker:
        return lightning_worker(args.lightning_worker)
    rounds = common.repeats(args)
    scratch = tempfile.mkdtemp(prefix="bench-demo-")
    commands = {
        "project (launch_ddp.py --demo --num_gpus 1)": (
            [sys.executable, "launch_ddp.py", "--demo", "--num_gpus", "1", "--checkpoint_dir", f"{scratch}/ckpt",
             "--log_dir", f"{scratch}/logs"], PROJECT_LINE, signal.SIGTERM),
        "lightning Trainer, same recipe": (
            [sys.executable, os.path.abspath(__file__), "--lightning_worker", f"{scratch}/lightning"], LIGHTNING_LINE,
            None)}
    results = {name: [] for name in commands}
    try:
        for _ in range(rounds + (0 if args.quick else 1)):  # a warm-up round (page cache), dropped below
            for name, (command, pattern, stop_signal) in commands.items():
                results[name].append(timed_run(command, pattern, args.full, stop_signal))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows, base = [], None
    for name, runs in results.items():
        runs = runs if args.quick else runs[1:]
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
    body = common.table(["run", f"seconds to {TARGET:.0f}% val acc (median)", "per run", "ratio to project",
                         "epoch reaching it, per run", "seconds to end of epoch 1, per run",
                         "seconds per later epoch, per run",
                         "val acc per epoch (%), per run"], rows)
    common.write_report("demo_vs_lightning", "Digits demo: time to 95% validation accuracy, project vs Lightning",
                        body, [
        f"{rounds} round(s){'' if args.quick else ' after 1 warm-up round'}, project and Lightning alternating; "
        "each run is a fresh process timed from its start (the project's includes launch_ddp.py and torchrun "
        "starting train_ddp.py: three Python start-ups).",
        "Same data, initial weights, sample order, crops, batch, optimizer, schedule and worker count, so the "
        "accuracy curves should agree closely; the time difference is then the per-epoch cost and start-up.",
        f"{'All 6 epochs run (--full).' if args.full else 'Runs are stopped once the target is reached.'}"])


if __name__ == "__main__":
    sys.exit(main())
