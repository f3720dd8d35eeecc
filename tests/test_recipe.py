"""recipe.py: learning-rate scaling, optimizers, schedules and EMA, in-process."""
import math

import pytest
import torch

from config import build_parser
from engine.recipe import build_ema, build_optimizer, build_scheduler, scaled_learning_rate


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
