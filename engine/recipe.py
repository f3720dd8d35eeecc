"""The training recipe: optimizer, learning-rate scaling and schedule, and EMA, all from torch.optim.

Parameter groups follow the modern recipes (torchvision's reference scripts, timm): weight decay
by kind (biases, normalisation layers' weights, the rest) and layer-wise learning-rate decay
(BEiT's). With none of those asked for, the groups are exactly the ones runs made before they
existed, so those runs' checkpoints load into the optimizer and resume bit-exact. Every group
dict names its kind, so a resume can change the decays in place (apply_weight_decay), and the
head's group comes first: the first group runs at the learning rate itself (what the loop logs
and what restart_scheduler scales the others by).
"""
import bisect
import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# Modules a layer-wise decay looks through: their children are layers of their own.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Normalisation layers, whose weights (scales) get --norm_weight_decay.
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.RMSNorm)
KINDS = ("default", "norm", "bias")  # weight-decay kinds, in their order among a scale's groups


def scaled_learning_rate(args, world_size):
    """--learning_rate scaled by the number of processes: none, linear, or sqrt (the seeds' rule)."""
    factor = {"none": 1.0, "linear": float(world_size), "sqrt": math.sqrt(world_size)}[args.scale_lr]
    return args.learning_rate * factor


def build_optimizer(model, args, learning_rate, head=None):
    """Fused implementations: faster, and they skip an update on the device when told the
    gradients are not finite (`found_inf`), so the loop needs no host sync to do it. Flags newer
    than a configuration are read with their defaults."""
    params = parameter_groups(model, head, learning_rate, args.backbone_lr_scale, args.weight_decay,
                              norm_weight_decay=getattr(args, "norm_weight_decay", None),
                              bias_weight_decay=getattr(args, "bias_weight_decay", None),
                              layer_decay=getattr(args, "layer_decay", None))
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=args.momentum, weight_decay=args.weight_decay,
                               nesterov=getattr(args, "nesterov", False), fused=True)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=args.weight_decay, fused=True)


def parameter_groups(model, head, learning_rate, backbone_lr_scale=1.0, weight_decay=0.0, norm_weight_decay=None,
                     bias_weight_decay=None, layer_decay=None):
    """The trainable parameters, as the optimizer takes them.

    With no decay by kind and no layer decay: the plain list, or with --backbone_lr_scale F two
    groups, the `head` module's (the classification layer) at the learning rate, then the
    backbone's at F times it; exactly what runs made before the other options existed.

    Otherwise one group per (learning-rate scale, weight-decay kind), each naming its "kind" and
    "weight_decay" ("lr" too when not the learning rate). With --bias_weight_decay a parameter named
    `bias` is of kind "bias" (normalisation layers' biases too); the other parameters of NORM_LAYERS
    are of kind "norm", the rest "default" (torchvision's set_weight_decay); a decay left None is
    `weight_decay`. The scale is F for the backbone times
    layer_decay ** (layers after the parameter's layer; parameter_layers), so the last layer, the
    head, runs at the learning rate. Groups come by scale from the head back to the input (the
    last layer at each scale), a scale's kinds in KINDS order; the schedule scales all alike."""
    params = [p for p in model.parameters() if p.requires_grad]
    if norm_weight_decay is None and bias_weight_decay is None and layer_decay in (None, 1.0):
        if backbone_lr_scale == 1.0:
            return params
        head_parameters = set(head.parameters())
        return [{"params": [p for p in params if p in head_parameters]},
                {"params": [p for p in params if p not in head_parameters], "lr": learning_rate * backbone_lr_scale}]
    decays = {"default": weight_decay,
              "norm": weight_decay if norm_weight_decay is None else norm_weight_decay,
              "bias": weight_decay if bias_weight_decay is None else bias_weight_decay}
    head_parameters = set(head.parameters()) if backbone_lr_scale != 1.0 else set()
    layers = parameter_layers(model)
    groups, last_layer = {}, {}  # (scale, kind) -> its parameters; scale -> the last layer at that scale
    for depth, layer in enumerate(layers):
        layer_scale = (layer_decay or 1.0) ** (len(layers) - 1 - depth)
        for owner, name, param in layer:
            if not param.requires_grad:
                continue
            scale = layer_scale * (1.0 if param in head_parameters else backbone_lr_scale)
            # torchvision's set_weight_decay: biases apart only with --bias_weight_decay; else a norm layer's are "norm"
            kind = ("bias" if name == "bias" and bias_weight_decay is not None
                    else "norm" if isinstance(owner, NORM_LAYERS) else "default")
            groups.setdefault((scale, kind), []).append(param)
            last_layer[scale] = depth
    # The head's layer first, its full-rate parameters before any backbone ones sharing it (timm's
    # ConvNeXt head holds a norm): group 0 runs at the learning rate, which the loop logs.
    order = sorted(groups, key=lambda key: (-last_layer[key[0]], -key[0], KINDS.index(key[1])))
    return [{"params": groups[scale, kind], "kind": kind, "weight_decay": decays[kind],
             **({"lr": learning_rate * scale} if scale != 1.0 else {})} for scale, kind in order]


def parameter_layers(model):
    """The model's parameters as consecutive layers in module order, each a list of (owning
    module, name in it, parameter): CONTAINERS (and the model itself) are looked through, any
    other module is one layer (ResNet: conv1, bn1, layer1.0, ..., layer4.1, fc). A module's own
    parameters come before its children's; modules without parameters are no layer, and a shared
    parameter belongs to the first layer that has it."""
    seen = set()

    def owned(modules):
        found = []
        for module in modules:
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    found.append((module, name, param))
        return found

    def split(module):
        layers = [owned([module])]
        for child in module.children():
            layers += split(child) if isinstance(child, CONTAINERS) else [owned(child.modules())]
        return [layer for layer in layers if layer]

    return split(model)


def apply_weight_decay(optimizer, weight_decay, norm_weight_decay=None, bias_weight_decay=None):
    """Set each group's weight decay by its "kind" (parameter_groups; a decay left None is
    `weight_decay`, as is a group without a kind), from the optimizer's next step on: a resume
    whose decays changed."""
    decays = {"norm": norm_weight_decay, "bias": bias_weight_decay}
    for group in optimizer.param_groups:
        decay = decays.get(group.get("kind"))
        group["weight_decay"] = weight_decay if decay is None else decay


def build_scheduler(optimizer, args, steps_per_epoch, total_steps=None):
    """Warm-up, then cosine decay to --lr_min, step decay, or constant; stepped per optimizer
    step, over `total_steps` (default: the whole run, --epochs epochs).

    The warm-up lasts --warmup_steps steps or --lr_warmup_epochs epochs (at most all steps but
    the last) and, as in torchvision's reference recipe, either ramps linearly from
    --lr_warmup_decay times each group's rate (default 1/(warm-up steps + 1)) or holds it at that
    fraction (default 0.01). --lr_min is one floor for all groups (torch's eta_min, as in those
    recipes). Flags newer than a configuration are read with their defaults."""
    total_steps = steps_per_epoch * args.epochs if total_steps is None else total_steps
    requested = args.warmup_steps or getattr(args, "lr_warmup_epochs", 0) * steps_per_epoch
    warmup = min(requested, max(total_steps - 1, 0))
    lr_scheduler = torch.optim.lr_scheduler
    if args.lr_scheduler == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1),
                                              eta_min=getattr(args, "lr_min", 0.0))
    elif args.lr_scheduler == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=max(args.lr_step_epochs * steps_per_epoch, 1),
                                   gamma=args.lr_gamma)
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    start = getattr(args, "lr_warmup_decay", None)
    if getattr(args, "lr_warmup_method", "linear") == "constant":
        ramp = lr_scheduler.ConstantLR(optimizer, factor=0.01 if start is None else start, total_iters=warmup)
    else:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1) if start is None else start,
                                     total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def restart_scheduler(optimizer, args, learning_rate, steps_per_epoch, remaining_steps):
    """A fresh schedule from this step on, over the run's remaining steps, peaking at this run's
    learning rate (--reset_lr_schedule): the optimizer's groups forget the old run's rates first,
    since a new scheduler keeps a group's existing `initial_lr`. Each group keeps its rate relative
    to the first one's (the head's, at the learning rate): --backbone_lr_scale and layer decay."""
    peak = optimizer.param_groups[0]["initial_lr"]
    scales = [group["initial_lr"] / peak for group in optimizer.param_groups]
    for group, scale in zip(optimizer.param_groups, scales):
        group["lr"] = group["initial_lr"] = learning_rate * scale
    return build_scheduler(optimizer, args, steps_per_epoch, total_steps=remaining_steps)


def load_scheduler_state(scheduler, state):
    """Restore a saved schedule into one built for this run's length: its position comes from
    `state`, its horizon stays this run's. When the horizon changed (--epochs on resume), the
    cosine is re-planned: the rate is the cosine of the new horizon at this step, as if the run had
    been planned that long, and it reaches its floor (eta_min, --lr_min) at the new last step. An
    unchanged horizon loads as saved, so an ordinary resume stays bit-exact."""
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



def build_ema(model, decay, warmup=False):
    """An exponential moving average of the weights and buffers (batch-norm statistics too). With
    `warmup` (timm's), the decay of an update is min(decay, (1 + n) / (10 + n)), n the updates
    done before it, so the average forgets the first (untrained) weights quickly."""
    multi_avg_fn = warmed_up_ema(decay) if warmup else get_ema_multi_avg_fn(decay)
    return AveragedModel(model, multi_avg_fn=multi_avg_fn, use_buffers=True)


def warmed_up_ema(decay):
    """AveragedModel's multi_avg_fn for build_ema's warm-up. The weight of the new values,
    1 - min(decay, (1 + n) / (10 + n)) = max(1 - decay, 9 / (10 + n)), is computed on the device
    from AveragedModel's count (a tensor there), so an update needs no host sync."""
    @torch.no_grad()
    def update(averaged, current, num_averaged):
        weight = torch.clamp(9 / (10 + num_averaged), min=1 - decay)
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight.to(averaged[0].dtype))
        else:  # integer buffers (batch counts): as get_ema_multi_avg_fn, rounded towards zero
            for mean, value in zip(averaged, current, strict=True):
                mean.copy_(mean * (1 - weight) + value * weight)
    return update
