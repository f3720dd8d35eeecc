"""The training recipe: optimizer, learning-rate scaling and schedule, and EMA, all from torch.optim."""
import bisect
import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def scaled_learning_rate(args, world_size):
    """--learning_rate scaled by the number of processes: none, linear, or sqrt (the seeds' rule)."""
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[args.scale_lr]
    return args.learning_rate * factor


def build_optimizer(model, args, learning_rate, head=None):
    """Fused implementations: faster, and they skip an update on the device when told the
    gradients are not finite (`found_inf`), so the loop needs no host sync to do it."""
    params = parameter_groups(model, head, args.backbone_lr_scale, learning_rate)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=args.momentum,
                               weight_decay=args.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=args.weight_decay, fused=True)


def parameter_groups(model, head, backbone_lr_scale, learning_rate):
    """The trainable parameters; with --backbone_lr_scale F two groups: the `head` module's (the
    classification layer) at the learning rate, then the backbone's at F times it (the schedule
    scales both)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if backbone_lr_scale == 1.0:
        return params
    head_parameters = set(head.parameters())
    return [{"params": [p for p in params if p in head_parameters]},
            {"params": [p for p in params if p not in head_parameters], "lr": learning_rate * backbone_lr_scale}]


def build_scheduler(optimizer, args, steps_per_epoch, total_steps=None):
    """Linear warm-up, then cosine decay to zero, step decay, or constant; stepped per optimizer
    step, over `total_steps` (default: the whole run, --epochs epochs)."""
    total_steps = steps_per_epoch * args.epochs if total_steps is None else total_steps
    warmup = min(args.warmup_steps, max(total_steps - 1, 0))
    lr_scheduler = torch.optim.lr_scheduler
    if args.lr_scheduler == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1))
    elif args.lr_scheduler == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=max(args.lr_step_epochs * steps_per_epoch, 1),
                                   gamma=args.lr_gamma)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def restart_scheduler(optimizer, args, learning_rate, steps_per_epoch, remaining_steps):
    """A fresh schedule from this step on, over the run's remaining steps, peaking at this run's
    learning rate (--reset_lr_schedule): the optimizer's groups forget the old run's rates first,
    since a new scheduler keeps a group's existing `initial_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = learning_rate
    return build_scheduler(optimizer, args, steps_per_epoch, total_steps=remaining_steps)


def load_scheduler_state(scheduler, state):
    """Restore a saved schedule into one built for this run's length: its position comes from
    `state`, its horizon stays this run's. When the horizon changed (--epochs on resume), the
    cosine is re-planned: the rate is the cosine of the new horizon at this step, as if the run had
    been planned that long, and it reaches zero at the new last step. An unchanged horizon loads
    as saved, so an ordinary resume stays bit-exact."""
    parts = getattr(scheduler, "_schedulers", [scheduler])
    horizons = [getattr(part, "T_max", None) for part in parts]
    scheduler.load_state_dict(state)
    for part, horizon in zip(parts, horizons):
        if horizon is None or horizon == part.T_max:
            continue
        part.T_max = horizon
        if part is parts[bisect.bisect_right(getattr(scheduler, "_milestones", []), scheduler.last_epoch)]:
            rates = [part.eta_min + (base - part.eta_min) * (1 + math.cos(math.pi * part.last_epoch / horizon)) / 2
                     for base in part.base_lrs]
            part._last_lr = scheduler._last_lr = rates
            for group, rate in zip(scheduler.optimizer.param_groups, rates):
                group["lr"] = rate


def build_ema(model, decay):
    """An exponential moving average of the weights and buffers (batch-norm statistics too)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
