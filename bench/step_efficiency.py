"""Step efficiency: the project's training loop vs a bare loop vs Lightning, on the same data.

All loops train on the same in-memory uint8 images (harness.synthetic_images) with the same model
(model.build_model), AdamW(lr=1e-3, fused=True) and the same normalisation (dataset.normalize):

- bare: harness.bare_loop, index + normalise + forward + backward + step (the 1.0 reference);
- project: harness.project_loop, i.e. the run train_ddp.py builds (training.build_training) trained
  by train_ddp.train_one_epoch over image_cache.CachedBatches;
- project --channels_last: the same with the --channels_last flag;
- lightning: a LightningModule fed by a DataLoader over a TensorDataset of the same uint8 tensors
  (permuted to NCHW), batch_size, shuffle, num_workers=0; a new Trainer per epoch, built outside
  the timing; images/s over on_train_epoch_start..on_train_epoch_end (a Callback). The row
  "lightning, whole fit()" times the trainer.fit call instead (its per-run setup included).

Workloads: ResNet-18 at 32 px, batch 64; tiny_cnn (model.TinyCNN) at 32 px, batch 64 (--quick:
batch 16, two steps per epoch).
Every round runs each loop for one epoch, interleaved; the first round is a warm-up.

    pip install -r bench/requirements.txt
    python bench/step_efficiency.py [--quick] [--repeats N] [--results_dir DIR]
"""
import logging
import time
import warnings

import common
import harness
import torch
import torch.nn.functional as F

from dataset import normalize
from model import build_model

WORKLOADS = [("resnet18", 32, 64, 1280), ("tiny_cnn", 32, 64, 6400)]  # model, px, batch, images per epoch
QUICK_BATCH, QUICK_IMAGES = 16, 32  # --quick: two steps per epoch


def lightning_loop(model_name, images, labels, batch_size):
    """A callable running one Lightning epoch; returns (epoch images/s, whole-fit images/s)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = build_model(model_name, 10)

        def training_step(self, batch, batch_index):
            x, y = batch
            return F.cross_entropy(self.model(normalize(x)), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.steps, self.start = 0, time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
            self.steps += 1

        def on_train_epoch_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start

    module = Classifier()
    data = TensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2), torch.as_tensor(labels))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)

    def run_epoch():
        timer = EpochTimer()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            callbacks=[timer])
        start = time.perf_counter()
        trainer.fit(module, loader)
        whole = time.perf_counter() - start
        images_done = timer.steps * batch_size
        return images_done / timer.seconds, images_done / whole
    return run_epoch


def measure(model_name, size, batch, count, rounds):
    images, labels = harness.synthetic_images(count, size)
    cpu = torch.device("cpu")
    lightning = lightning_loop(model_name, images, labels, batch)
    whole_fit = []

    def lightning_epoch():
        epoch_rate, fit_rate = lightning()
        whole_fit.append(fit_rate)
        return epoch_rate

    def project(*flags):
        return harness.project_loop(harness.bench_args(model_name, batch, size, flags),
                                    harness.in_memory_data(images, labels, batch, cpu), cpu)

    runners = {"bare": harness.bare_loop(model_name, images, labels, batch, cpu),
               "project": project(),
               "project --channels_last": project("--channels_last"),
               "lightning": lightning_epoch}
    results = harness.interleave(runners, rounds)
    results["lightning, whole fit()"] = whole_fit[1:]  # the warm-up round dropped, as interleave does
    rows = []
    for name, values in results.items():
        median, ratio, spread = common.summary(values, results["bare"])
        rows.append([f"{model_name} {size}px b{batch}", name, common.fmt(median), f"{ratio:.3f}", spread])
    return rows


def main():
    args = common.parser(__doc__, repeats=5).parse_args()
    import lightning  # noqa: F401  (its import sets its loggers' levels: quiet them afterwards)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|GPU available but not used).*")
    rounds = common.repeats(args)
    rows, sizes = [], []
    for model_name, size, batch, count in WORKLOADS:
        batch, count = (QUICK_BATCH, QUICK_IMAGES) if args.quick else (batch, count)
        sizes.append(f"{model_name}: {count} images ({count // batch} steps) per epoch")
        rows += measure(model_name, size, batch, count, rounds)
    body = common.table(["workload", "loop", "images/s (median)", "ratio to bare (median)", "ratio range"], rows)
    title = "Step efficiency: project loop vs bare loop vs Lightning"
    common.write_report(args.results_dir, "step_efficiency", title, body, notes=[
        f"{rounds} timed round(s) after 1 warm-up round, loops interleaved within each round; ratios are "
        "per round (same round, side by side), then median and min..max.",
        "Epoch sizes: " + "; ".join(sizes) + ". One process, CPU, float32.",
        "Every loop feeds contiguous NCHW batches to a contiguous model; --channels_last converts both.",
        "'lightning' is timed from on_train_epoch_start to on_train_epoch_end; 'lightning, whole fit()' "
        "times trainer.fit (setup and teardown included), Trainer construction excluded in both."])


if __name__ == "__main__":
    main()
