"""recipe.py: learning-rate scaling, optimizers, schedules and EMA, in-process."""
import copy
import math

import pytest
import torch
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from config import build_parser
from engine.recipe import (
    apply_weight_decay,
    build_ema,
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    parameter_groups,
    restart_scheduler,
    scaled_learning_rate,
)


def flags(*argv):
    """train_ddp.py's flags with their real defaults (no directory checks: nothing is trained here)."""
    return build_parser().parse_args([str(a) for a in argv])


# ------------------------------------------------------------------ learning-rate scaling

@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("mode, factor", [("none", lambda n: 1.0), ("linear", lambda n: float(n)),
                                          ("sqrt", math.sqrt)])
def test_scaled_learning_rate_by_the_number_of_processes(mode, factor, world_size):
    args = flags("--learning_rate", 0.003, "--scale_lr", mode)
    assert scaled_learning_rate(args, world_size) == pytest.approx(0.003 * factor(world_size), rel=1e-15)


def test_scaled_learning_rate_examples():
    assert scaled_learning_rate(flags("--learning_rate", 0.1, "--scale_lr", "linear"), 8) == pytest.approx(0.8)
    assert scaled_learning_rate(flags("--learning_rate", 0.1, "--scale_lr", "sqrt"), 4) == pytest.approx(0.2)
    assert scaled_learning_rate(flags("--learning_rate", 0.1), 8) == 0.1  # default: no scaling


# ------------------------------------------------------------------ optimizers

def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen parameters are not handed to the optimizer
    return model


def test_sgd_gets_momentum_weight_decay_and_the_given_learning_rate():
    model = tiny_model()
    optimizer = build_optimizer(model, flags("--optimizer", "sgd", "--momentum", 0.7, "--weight_decay", 0.02), 0.05)
    assert isinstance(optimizer, torch.optim.SGD)
    [group] = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], group["fused"]) == (0.05, 0.7, 0.02, True)
    assert group["nesterov"] is False and group["dampening"] == 0
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters() if p.requires_grad]


def test_adamw_is_the_default_with_decoupled_weight_decay():
    model = tiny_model()
    optimizer = build_optimizer(model, flags("--weight_decay", 0.03), 0.002)
    assert isinstance(optimizer, torch.optim.AdamW)
    [group] = optimizer.param_groups
    assert (group["lr"], group["betas"], group["weight_decay"], group["fused"]) == (0.002, (0.9, 0.999), 0.03, True)
    assert len(group["params"]) == 3


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_shrinks_weights_by_lr_times_decay_on_a_zero_gradient(name):
    # With a zero gradient, SGD's coupled decay and AdamW's decoupled decay both give w * (1 - lr * wd)
    # on the first step (AdamW's Adam part is 0 / (0 + eps) = 0).
    layer = torch.nn.Linear(2, 2)
    before = layer.weight.detach().clone()
    optimizer = build_optimizer(layer, flags("--optimizer", name, "--weight_decay", 0.5), 0.1)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), before * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ parameter groups

RESNET18_LAYERS = ["conv1", "bn1"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["fc"]


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5)


def names_of(model):
    return {id(p): name for name, p in model.named_parameters()}


def group_of_each_parameter(model, groups):
    """parameter name -> its group, after checking every trainable parameter is in exactly one group."""
    names = names_of(model)
    placed = [names[id(p)] for group in groups for p in group["params"]]
    assert sorted(placed) == sorted(name for name, p in model.named_parameters() if p.requires_grad)
    return {names[id(p)]: group for group in groups for p in group["params"]}


def fixed_gradients(params, step=0):
    """Deterministic, distinct gradients (no RNG): a ramp per parameter, shifted by the step."""
    for k, p in enumerate(params):
        p.grad = torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape) * (k + 1) / 7 + 0.01 * step


def test_default_options_give_todays_parameter_list():
    model = tiny_model()
    expected = [p for p in model.parameters() if p.requires_grad]
    for layer_decay in (None, 1.0):
        params = parameter_groups(model, model[1], 0.1, weight_decay=0.05, layer_decay=layer_decay)
        assert [id(p) for p in params] == [id(p) for p in expected]


def test_backbone_lr_scale_alone_gives_todays_two_groups():
    model = resnet18()
    groups = parameter_groups(model, model.fc, 0.1, backbone_lr_scale=0.25, weight_decay=0.05)
    assert [sorted(group) for group in groups] == [["params"], ["lr", "params"]]  # no kind, no weight_decay
    assert [id(p) for p in groups[0]["params"]] == [id(model.fc.weight), id(model.fc.bias)]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for name, p in model.named_parameters()
                                                    if not name.startswith("fc.")]
    assert groups[1]["lr"] == 0.1 * 0.25


@pytest.mark.parametrize("backbone_lr_scale", [1.0, 0.1])
def test_an_optimizer_saved_before_the_new_options_loads_and_continues_bit_exact(backbone_lr_scale):
    # The optimizer as build_optimizer made it before norm/bias decay and layer decay existed.
    def todays(model):
        params = [p for p in model.parameters() if p.requires_grad]
        if backbone_lr_scale != 1.0:
            params = [{"params": params[-2:]}, {"params": params[:-2], "lr": 0.05 * backbone_lr_scale}]
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01, fused=True)

    old_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    new_model = copy.deepcopy(old_model)
    old = todays(old_model)
    for step in range(2):
        fixed_gradients(old_model.parameters(), step)
        old.step()
    new_model.load_state_dict(old_model.state_dict())
    args = flags("--optimizer", "sgd", "--momentum", 0.9, "--weight_decay", 0.01, "--backbone_lr_scale",
                 backbone_lr_scale)
    new = build_optimizer(new_model, args, 0.05, head=new_model[2])
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # as saved: not sharing the old one's momentum tensors
    for step in range(2, 4):
        for model, optimizer in ((old_model, old), (new_model, new)):
            fixed_gradients(model.parameters(), step)
            optimizer.step()
    for before, after in zip(old_model.parameters(), new_model.parameters()):
        assert torch.equal(before, after)


def test_resnet18_groups_by_weight_decay_kind():
    model = resnet18()
    groups = parameter_groups(model, model.fc, 0.1, weight_decay=0.05, norm_weight_decay=0.0,
                              bias_weight_decay=0.001)
    assert [(g["kind"], g["weight_decay"]) for g in groups] == [("default", 0.05), ("norm", 0.0), ("bias", 0.001)]
    assert all("lr" not in g for g in groups)  # all at the learning rate
    of = group_of_each_parameter(model, groups)
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convolutions = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert (len(batch_norms), len(convolutions)) == (20, 20)
    assert sorted(n for n, g in of.items() if g["kind"] == "norm") == sorted(f"{n}.weight" for n in batch_norms)
    assert sorted(n for n, g in of.items() if g["kind"] == "bias") == sorted([f"{n}.bias" for n in batch_norms]
                                                                               + ["fc.bias"])
    assert sorted(n for n, g in of.items() if g["kind"] == "default") == sorted([f"{n}.weight" for n in convolutions]
                                                                                  + ["fc.weight"])


def test_every_normalisation_layer_is_of_kind_norm_and_an_unset_decay_is_the_weight_decay():
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True), nn.BatchNorm2d(4),
                          nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 3, bias=False))
    # torchvision's set_weight_decay: without --bias_weight_decay a norm layer's bias is "norm" too
    groups = parameter_groups(model, model[6], 0.1, weight_decay=0.05, norm_weight_decay=0.0)
    of = group_of_each_parameter(model, groups)
    assert {name: group["kind"] for name, group in of.items()} == {
        "0.weight": "default", "0.bias": "default", "1.weight": "norm", "1.bias": "norm", "2.weight": "norm",
        "2.bias": "norm", "3.weight": "norm", "3.bias": "norm", "5.weight": "norm", "5.bias": "norm",
        "6.weight": "default"}
    assert {group["kind"]: group["weight_decay"] for group in groups} == {"default": 0.05, "norm": 0.0}
    # with it, every bias is "bias"
    groups = parameter_groups(model, model[6], 0.1, weight_decay=0.05, norm_weight_decay=0.0, bias_weight_decay=0.01)
    of = group_of_each_parameter(model, groups)
    assert {name for name, group in of.items() if group["kind"] == "bias"} == {"0.bias", "1.bias", "2.bias",
                                                                                "3.bias", "5.bias"}
    assert {group["kind"]: group["weight_decay"] for group in groups} == {"default": 0.05, "norm": 0.0, "bias": 0.01}


def test_frozen_parameters_are_left_out_and_empty_groups_dropped():
    model = tiny_model()  # Linear(3, 4) with its bias frozen, then Linear(4, 2)
    groups = parameter_groups(model, model[1], 0.1, weight_decay=0.05, bias_weight_decay=0.0)
    assert [(g["kind"], [id(p) for p in g["params"]]) for g in groups] == [
        ("default", [id(model[0].weight), id(model[1].weight)]), ("bias", [id(model[1].bias)])]


def test_a_shared_parameter_is_in_one_group_at_its_first_layers_scale():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    model[2].weight = model[0].weight  # tied: one tensor, two modules
    groups = parameter_groups(model, model[2], 0.1, weight_decay=0.05, layer_decay=0.5)
    assert [(group.get("lr", 0.1), [id(p) for p in group["params"]]) for group in groups] == [
        (0.1, [id(model[2].bias)]), (0.05, [id(model[0].weight), id(model[0].bias)])]


def resnet18_layer_index(name):
    return next(i for i, prefix in enumerate(RESNET18_LAYERS) if name.startswith(prefix + "."))


def test_layer_decay_scales_resnet18s_layers_from_the_head_back_to_the_input():
    model = resnet18()
    groups = parameter_groups(model, model.fc, 0.1, weight_decay=0.05, layer_decay=0.5)
    of = group_of_each_parameter(model, groups)
    scales = {name: group.get("lr", 0.1) / 0.1 for name, group in of.items()}
    assert {name: scale for name, scale in scales.items() if name.startswith("fc.")} == {"fc.weight": 1.0,
                                                                                          "fc.bias": 1.0}
    for name, scale in scales.items():
        assert scale == pytest.approx(0.5 ** (10 - resnet18_layer_index(name)), rel=1e-12), name
    in_module_order = [scales[name] for name, _ in model.named_parameters()]
    assert in_module_order == sorted(in_module_order) and in_module_order[0] == pytest.approx(0.5 ** 10)
    assert groups[0]["params"][0] is model.fc.weight and "lr" not in groups[0]  # the head's group first
    # One group per (layer, kind): fc's weight and bias together; each block a conv and a norm group (the
    # norm layers' biases with them: no --bias_weight_decay); bn1 a norm group; conv1 only a weight.
    assert len(groups) == 1 + 2 * 8 + 1 + 1


def test_layer_decay_multiplies_with_backbone_lr_scale():
    model = resnet18()
    groups = parameter_groups(model, model.fc, 0.1, backbone_lr_scale=0.1, weight_decay=0.05, layer_decay=0.75)
    for name, group in group_of_each_parameter(model, groups).items():
        depth = resnet18_layer_index(name)
        expected = 1.0 if name.startswith("fc.") else 0.1 * 0.75 ** (10 - depth)
        assert group.get("lr", 0.1) == pytest.approx(0.1 * expected, rel=1e-12), name


def test_build_optimizer_passes_the_groups_and_their_decays():
    model = resnet18()
    args = flags("--optimizer", "sgd", "--weight_decay", 0.05, "--norm_weight_decay", 0.0, "--layer_decay", 0.5)
    optimizer = build_optimizer(model, args, 0.1, head=model.fc)
    assert len(optimizer.param_groups) == 19
    assert optimizer.param_groups[0]["lr"] == 0.1 and optimizer.param_groups[-1]["lr"] == pytest.approx(0.1 * 0.5 ** 10)
    assert {g["kind"]: g["weight_decay"] for g in optimizer.param_groups} == {"default": 0.05, "norm": 0.0}


def test_apply_weight_decay_sets_each_groups_decay_by_its_kind():
    model = resnet18()
    optimizer = build_optimizer(model, flags("--optimizer", "sgd", "--weight_decay", 0.05, "--norm_weight_decay", 0.0,
                                             "--bias_weight_decay", 0.0), 0.1, head=model.fc)
    apply_weight_decay(optimizer, 0.2, norm_weight_decay=0.01)
    assert [(g["kind"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("default", 0.2), ("norm", 0.01), ("bias", 0.2)]  # bias: unset, so the weight decay
    plain = build_optimizer(tiny_model(), flags("--weight_decay", 0.05), 0.1)
    apply_weight_decay(plain, 0.3, norm_weight_decay=0.0, bias_weight_decay=0.0)
    assert [g["weight_decay"] for g in plain.param_groups] == [0.3]  # groups without a kind


def test_apply_weight_decay_takes_effect_on_the_next_step():
    # SGD with a zero gradient: w <- w * (1 - lr * decay), the norm weight by its own decay.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    optimizer = build_optimizer(model, flags("--optimizer", "sgd", "--weight_decay", 0.05, "--norm_weight_decay", 0.0),
                                0.1, head=model[0])
    apply_weight_decay(optimizer, 0.5, norm_weight_decay=0.25)
    before = [p.detach().clone() for p in (model[0].weight, model[1].weight)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(model[0].weight.detach(), before[0] * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[1].weight.detach(), before[1] * (1 - 0.1 * 0.25), rtol=1e-6, atol=1e-7)


def test_nesterov_reaches_sgd_and_matches_torchs_reference_implementation():
    def trained(build):
        model = tiny_model()
        optimizer = build(model)
        for step in range(4):
            fixed_gradients([p for p in model.parameters() if p.requires_grad], step)
            optimizer.step()
        return [p.detach() for p in model.parameters()], optimizer

    args = flags("--optimizer", "sgd", "--momentum", 0.9, "--weight_decay", 0.01, "--nesterov")
    ours, optimizer = trained(lambda model: build_optimizer(model, args, 0.1))
    assert optimizer.param_groups[0]["nesterov"] is True
    reference, _ = trained(lambda model: torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                               lr=0.1, momentum=0.9, weight_decay=0.01,
                                                               nesterov=True, foreach=False))
    classical, _ = trained(lambda model: torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                                lr=0.1, momentum=0.9, weight_decay=0.01,
                                                                foreach=False))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours[0], classical[0], rtol=1e-4, atol=1e-5)  # nesterov changes the steps


# ------------------------------------------------------------------ schedules

def closed_form_lr(index, lr, total, warmup, kind, steps_per_epoch=1, step_epochs=30, gamma=0.1):
    """The learning rate optimizer step `index` (0-based) uses: a linear warm-up from lr/(warmup+1)
    to lr over `warmup` steps, then cosine to zero over the remaining steps, step decay by gamma
    every step_epochs epochs, or constant."""
    if index < warmup:
        start = 1 / (warmup + 1)
        return lr * (start + (1 - start) * index / warmup)
    if kind == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (index - warmup) / (total - warmup)))
    if kind == "step":
        return lr * gamma ** ((index - warmup) // (step_epochs * steps_per_epoch))
    return lr


def used_learning_rates(args, steps_per_epoch, lr=0.01):
    """The learning rate each optimizer step of the run uses, stepping as train_ddp.py does."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_scheduler(optimizer, args, steps_per_epoch)
    used = []
    for _ in range(steps_per_epoch * args.epochs):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used, optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_cosine_schedule_warms_up_linearly_then_decays_to_zero(warmup):
    args = flags("--epochs", 3, "--warmup_steps", warmup)  # cosine is the default
    used, after_last = used_learning_rates(args, steps_per_epoch=5)
    expected = [closed_form_lr(i, 0.01, 15, warmup, "cosine") for i in range(15)]
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert used[0] == pytest.approx(0.01 / (warmup + 1))
    assert after_last == pytest.approx(0.0, abs=1e-15)  # the end of the cosine is zero


def test_step_schedule_multiplies_by_gamma_every_lr_step_epochs_epochs():
    args = flags("--lr_scheduler", "step", "--lr_step_epochs", 2, "--lr_gamma", 0.5, "--epochs", 5)
    used, _ = used_learning_rates(args, steps_per_epoch=3)
    assert used == pytest.approx([0.01] * 6 + [0.005] * 6 + [0.0025] * 3, rel=1e-12)
    expected = [closed_form_lr(i, 0.01, 15, 0, "step", steps_per_epoch=3, step_epochs=2, gamma=0.5)
                for i in range(15)]
    assert used == pytest.approx(expected, rel=1e-9)


def test_constant_schedule_with_warm_up_ramps_then_stays_at_the_peak():
    args = flags("--lr_scheduler", "none", "--warmup_steps", 3, "--epochs", 2)
    used, after_last = used_learning_rates(args, steps_per_epoch=4)
    assert used == pytest.approx([0.0025, 0.005, 0.0075] + [0.01] * 5, rel=1e-12)
    assert after_last == pytest.approx(0.01, rel=1e-12)


def test_constant_schedule_without_warm_up_never_changes_the_learning_rate():
    used, after_last = used_learning_rates(flags("--lr_scheduler", "none", "--epochs", 2), steps_per_epoch=3)
    assert used == [0.01] * 6 and after_last == 0.01


def test_warm_up_longer_than_the_run_is_cut_to_leave_one_cosine_step():
    # 4 steps in all and --warmup_steps 100: warm-up takes 3 steps, the last step is the cosine's first.
    used, _ = used_learning_rates(flags("--epochs", 2, "--warmup_steps", 100), steps_per_epoch=2)
    assert used == pytest.approx([0.0025, 0.005, 0.0075, 0.01], rel=1e-12)


def test_schedule_state_round_trips_through_its_state_dict():
    # Resume restores the scheduler from the checkpoint: the continued sequence must be the same.
    args = flags("--epochs", 2, "--warmup_steps", 2)
    straight, _ = used_learning_rates(args, steps_per_epoch=4)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = build_scheduler(optimizer, args, 4)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    optimizer2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler2 = build_scheduler(optimizer2, args, 4)
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    resumed = []
    for _ in range(5):
        resumed.append(optimizer2.param_groups[0]["lr"])
        optimizer2.step()
        scheduler2.step()
    assert resumed == pytest.approx(straight[3:], rel=1e-12, abs=1e-15)


def todays_scheduler(optimizer, args, steps_per_epoch):
    """build_scheduler as it was before --lr_min and the warm-up options: their defaults must give this."""
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


@pytest.mark.parametrize("kind", ["cosine", "step", "none"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_default_schedule_options_give_todays_schedule_exactly(kind, warmup):
    args = flags("--epochs", 3, "--warmup_steps", warmup, "--lr_scheduler", kind, "--lr_step_epochs", 1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = todays_scheduler(optimizer, args, 4)
    expected = []
    for _ in range(12):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    used, after_last = used_learning_rates(args, steps_per_epoch=4)
    assert used + [after_last] == expected + [optimizer.param_groups[0]["lr"]]  # bit for bit


def cosine_to(lr_min, index, lr, total, warmup):
    """The cosine after the warm-up, decaying to lr_min (torch's CosineAnnealingLR, eta_min)."""
    return lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * (index - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup", [0, 2])
def test_cosine_schedule_ends_at_lr_min(warmup):
    args = flags("--epochs", 3, "--warmup_steps", warmup, "--lr_min", 0.001)
    used, after_last = used_learning_rates(args, steps_per_epoch=4)
    assert used[warmup:] == pytest.approx([cosine_to(0.001, i, 0.01, 12, warmup) for i in range(warmup, 12)],
                                          rel=1e-9)
    assert after_last == pytest.approx(0.001, rel=1e-9)


def test_linear_warm_up_starts_at_lr_warmup_decay_times_the_peak():
    # torchvision's LinearLR warm-up: lr * (decay + (1 - decay) * step / warm-up steps).
    args = flags("--epochs", 2, "--warmup_steps", 4, "--lr_warmup_decay", 0.1)
    used, _ = used_learning_rates(args, steps_per_epoch=5)
    assert used[:4] == pytest.approx([0.01 * (0.1 + 0.9 * i / 4) for i in range(4)], rel=1e-12)
    assert used[4:] == pytest.approx([cosine_to(0.0, i, 0.01, 10, 4) for i in range(4, 10)], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("decay, factor", [(None, 0.01), (0.25, 0.25)])
def test_constant_warm_up_holds_lr_warmup_decay_times_the_peak(decay, factor):
    # torchvision's ConstantLR warm-up: lr * decay for the warm-up steps (0.01 by default), then the schedule.
    argv = ["--epochs", 2, "--warmup_steps", 3, "--lr_warmup_method", "constant", "--lr_min", 0.002]
    used, after_last = used_learning_rates(flags(*argv, *(["--lr_warmup_decay", decay] if decay else [])), 5)
    assert used[:3] == pytest.approx([0.01 * factor] * 3, rel=1e-12)
    assert used[3:] == pytest.approx([cosine_to(0.002, i, 0.01, 10, 3) for i in range(3, 10)], rel=1e-9)
    assert after_last == pytest.approx(0.002, rel=1e-9)


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_lr_warmup_epochs_is_that_many_epochs_of_warm_up_steps(method):
    by_epochs, _ = used_learning_rates(flags("--epochs", 4, "--lr_warmup_epochs", 2, "--lr_warmup_method", method), 3)
    by_steps, _ = used_learning_rates(flags("--epochs", 4, "--warmup_steps", 6, "--lr_warmup_method", method), 3)
    assert by_epochs == by_steps
    assert by_epochs[5] < by_epochs[6] == 0.01  # the peak is reached at step 6, after two epochs of 3 steps


def test_restart_scheduler_keeps_each_groups_rate_relative_to_the_head():
    args = flags("--epochs", 2, "--lr_scheduler", "none")
    head, backbone = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [head]}, {"params": [backbone], "lr": 0.001}], lr=0.01)
    build_scheduler(optimizer, args, 3)
    restart_scheduler(optimizer, args, 0.04, 3, remaining_steps=4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.04, 0.004], rel=1e-12)
    assert optimizer.param_groups[0]["initial_lr"] == 0.04  # the head's: exactly the learning rate
    single = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    build_scheduler(single, args, 3)
    restart_scheduler(single, args, 0.03, 3, remaining_steps=4)
    assert single.param_groups[0]["lr"] == single.param_groups[0]["initial_lr"] == 0.03


def test_a_replanned_cosine_still_ends_at_lr_min():
    # Saved after 3 of 8 steps, resumed with a 16-step horizon: the rate follows the longer cosine to lr_min.
    def run(epochs):
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=0.01)
        return optimizer, build_scheduler(optimizer, flags("--epochs", epochs, "--lr_min", 0.002), 4)

    optimizer, scheduler = run(2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    optimizer2, scheduler2 = run(4)
    load_scheduler_state(scheduler2, scheduler.state_dict())
    used = []
    for _ in range(13):
        used.append(optimizer2.param_groups[0]["lr"])
        optimizer2.step()
        scheduler2.step()
    assert used == pytest.approx([cosine_to(0.002, i, 0.01, 16, 0) for i in range(3, 16)], rel=1e-9)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(0.002, rel=1e-9)


# ------------------------------------------------------------------ EMA

def test_ema_starts_at_the_weights_then_averages_weights_and_buffers_with_the_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = build_ema(model, decay=0.75)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies
    torch.testing.assert_close(ema.module.state_dict(), first)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)  # a buffer: averaged too (batch-norm statistics)
    ema.update_parameters(model)
    averaged = ema.module.state_dict()
    torch.testing.assert_close(averaged["0.weight"], 0.75 * first["0.weight"] + 0.25 * model[0].weight.detach())
    torch.testing.assert_close(averaged["1.running_mean"], first["1.running_mean"] + 0.25 * 2.0)
    assert int(ema.n_averaged) == 2
    assert list(averaged) == list(model.state_dict())  # the plain model's keys: no "module." prefix
    assert ema.module is not model


def ema_test_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))


def nudge(model, step):
    """A deterministic change of every weight and buffer, as a training step would make."""
    with torch.no_grad():
        for k, tensor in enumerate(model.state_dict().values()):
            if tensor.is_floating_point():
                tensor.add_(torch.linspace(0.5, -1.0, tensor.numel()).reshape(tensor.shape) * (k + 1) + step)
            else:
                tensor.add_(1)  # num_batches_tracked


def test_ema_warm_up_uses_decay_min_of_decay_and_1_plus_n_over_10_plus_n():
    model = ema_test_model()
    ema = build_ema(model, decay=0.5, warmup=True)  # (1 + n) / (10 + n) passes 0.5 at n = 9: both regimes
    expected = {name: tensor.double().clone() for name, tensor in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies
    for n in range(1, 13):
        nudge(model, n)
        ema.update_parameters(model)
        decay = min(0.5, (1 + n) / (10 + n))  # n updates done before this one
        for name, value in model.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * value.double()
            if not value.is_floating_point():
                expected[name] = expected[name].trunc()  # integer buffers round towards zero, as without warm-up
    averaged = ema.module.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name].double(), value, rtol=1e-5, atol=1e-5, msg=name)
    assert int(ema.n_averaged) == 13


def test_ema_warm_up_forgets_the_first_weights_faster_than_the_plain_ema():
    model, plain_model = ema_test_model(), ema_test_model()
    warm, plain = build_ema(model, decay=0.9999, warmup=True), build_ema(plain_model, decay=0.9999)
    for ema, source in ((warm, model), (plain, plain_model)):
        ema.update_parameters(source)
        nudge(source, 1)
        ema.update_parameters(source)
    # Second update: decay min(0.9999, 2 / 11), so 9/11 of the new weights.
    first_weight = ema_test_model()[0].weight.detach()
    torch.testing.assert_close(warm.module[0].weight, first_weight * 2 / 11 + model[0].weight.detach() * 9 / 11)
    torch.testing.assert_close(plain.module[0].weight, first_weight * 0.9999 + model[0].weight.detach() * 0.0001)


def test_ema_without_warm_up_is_torchs_ema_exactly():
    model = ema_test_model()
    ours, reference = build_ema(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
                                                            use_buffers=True)
    for step in range(4):
        nudge(model, step)
        ours.update_parameters(model)
        reference.update_parameters(model)
    for (name, mine), theirs in zip(ours.module.state_dict().items(), reference.module.state_dict().values()):
        assert torch.equal(mine, theirs), name
