"""Experiment logging for train_ddp.py: Weights & Biases and/or TensorBoard, from rank 0 only.

    logger = RunLogger(args, ctx, config=vars(args))
    logger.log({"train/loss": loss, "train/learning_rate": lr}, step=global_step)
    logger.close()

Logging is a side channel: a missing package, no network or a bad API key print one line,
`warning: <backend> logging disabled: <reason>`, and training goes on without that backend.
"""
import json
import os
import sys

# wandb.init waits 90 s for the server by default; a node without network should give up sooner
# and train. WANDB_INIT_TIMEOUT in the environment still sets it (e.g. for a slow proxy).
WANDB_INIT_TIMEOUT_S = 30.0


def _warn(backend, reason):
    print(f"warning: {backend} logging disabled: {reason}", file=sys.stderr, flush=True)


def _reason(exc):
    # wandb errors can span several lines (hints); the warning promises one line.
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class RunLogger:
    """One wandb run and/or one TensorBoard event file per job, written by rank 0.

    Other ranks get a logger whose methods do nothing and that imports nothing: N processes must
    not make N runs, and the metrics they would log are already all-reduced onto rank 0.
    """

    def __init__(self, args, ctx, config=None):
        self.wandb_run = None
        self.tb_writer = None
        if not ctx.is_main:
            return
        config = dict(vars(args) if config is None else config)
        if args.use_wandb:
            self.wandb_run = self._start_wandb(args, config)
        if args.use_tensorboard:
            self.tb_writer = self._start_tensorboard(args, config)

    def _start_wandb(self, args, config):
        try:
            import wandb
        except ImportError as exc:
            _warn("wandb", f"cannot import wandb ({exc}); pip install wandb")
            return None
        try:
            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT_S))
            os.makedirs(args.log_dir, exist_ok=True)
            # No mode= here: WANDB_MODE (online, offline, disabled) from the environment decides.
            run = wandb.init(project=args.wandb_project, name=args.wandb_name, config=config,
                             dir=args.log_dir, settings=wandb.Settings(init_timeout=timeout))
        except Exception as exc:  # no network, bad key, timeout: train on without it
            _warn("wandb", _reason(exc))
            return None
        if run.offline:  # (run.url warns in an offline run, so ask this first)
            print(f"wandb: offline run in {run.settings.sync_dir} "
                  f"(upload it later with `wandb sync {run.settings.sync_dir}`)", flush=True)
        elif run.url:  # None when WANDB_MODE=disabled
            print(f"wandb: run {run.url}", flush=True)
        return run

    def _start_tensorboard(self, args, config):
        path = os.path.join(args.log_dir, "tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            _warn("tensorboard", f"cannot import tensorboard ({exc}); pip install tensorboard")
            return None
        try:
            writer = SummaryWriter(log_dir=path)
            # Indented JSON is a Markdown code block: TensorBoard's Text tab shows it verbatim.
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), global_step=0)
        except Exception as exc:
            _warn("tensorboard", _reason(exc))
            return None
        print(f"tensorboard: writing to {path} (view with `tensorboard --logdir {path}`)", flush=True)
        return writer

    def log(self, metrics, step):
        """Log scalars (python numbers or 0-dim tensors) under their names at `step`."""
        if self.wandb_run is None and self.tb_writer is None:
            return
        # float() on a device tensor is a host sync: call this at log points, not every step.
        values = {name: v if isinstance(v, (int, float)) else float(v) for name, v in metrics.items()}
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(values, step=step)
            except Exception as exc:
                _warn("wandb", _reason(exc))
                self._finish_wandb()
        if self.tb_writer is not None:
            for name, value in values.items():
                self.tb_writer.add_scalar(name, value, global_step=step)

    def close(self, exit_code=None):
        """Flush and close both backends (safe to call twice); a nonzero exit_code marks the
        wandb run as failed."""
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
        self._finish_wandb(exit_code)

    def _finish_wandb(self, exit_code=None):
        run, self.wandb_run = self.wandb_run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as exc:  # a failed upload at the end must not turn a good run into a crash
                print(f"warning: wandb finish failed: {_reason(exc)}", file=sys.stderr, flush=True)
