"""The training recipe: optimizer, learning-rate scaling and schedule, and EMA, all from torch.optim."""
import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def scaled_learning_rate(args, world_size):
    """--learning_rate scaled by the number of processes: none, linear, or sqrt (the seeds' rule)."""
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[args.scale_lr]
    return args.learning_rate * factor


def build_optimizer(model, args, learning_rate):
    """Fused implementations: faster, and they skip an update on the device when told the
    gradients are not finite (`found_inf`), so the loop needs no host sync to do it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=args.momentum,
                               weight_decay=args.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=args.weight_decay, fused=True)


def build_scheduler(optimizer, args, steps_per_epoch):
    """Linear warm-up, then cosine decay to zero, step decay, or constant; stepped per optimizer step."""
    total_steps = steps_per_epoch * args.epochs
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


def build_ema(model, decay):
    """An exponential moving average of the weights and buffers (batch-norm statistics too)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
