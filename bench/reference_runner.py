"""The reference's runner for bench/vs_reference.py: under torchrun, patch the few CUDA/NCCL-only
calls of torchvision's references/classification/train.py (vs_reference.py's docstring lists
patches 1-6), then run it as __main__. Imports nothing of the project.

    python bench/reference_runner.py PATH/TO/train.py [its flags...]
"""
import os
import sys

EPOCH_LINE = "VSREF_TRAIN_EPOCH"  # printed by patch 6, parsed by vs_reference.py


def reference_worker(train_py, flags):
    """Patch the few CUDA/NCCL-only calls (vs_reference.py's docstring, patches 1-6), then run
    `train_py` as __main__ with `flags`."""
    import builtins
    import runpy
    import time
    import types

    import torch
    import torch.distributed as dist

    ref_dir = os.path.dirname(os.path.abspath(train_py))
    bench = os.path.dirname(os.path.abspath(__file__))
    # The reference's utils.py (and presets.py, transforms.py), never the project's utils.py.
    sys.path[:] = [ref_dir] + [p for p in sys.path if os.path.abspath(p or ".") not in (bench, os.path.dirname(bench))]
    torch.cuda.set_device = lambda device: None  # 1
    init_process_group = dist.init_process_group

    def gloo_init_process_group(*args, **kwargs):  # 2
        if kwargs.get("backend") == "nccl":
            kwargs["backend"] = "gloo"
        elif args and args[0] == "nccl":
            args = ("gloo",) + args[1:]
        return init_process_group(*args, **kwargs)
    dist.init_process_group = torch.distributed.init_process_group = gloo_init_process_group

    class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):  # 3
        def __init__(self, module, device_ids=None, *args, **kwargs):
            kwargs.pop("output_device", None)
            super().__init__(module, None, *args, **kwargs)
    torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel

    import utils  # the reference's own utils.py (ref_dir is first on sys.path)
    assert os.path.dirname(os.path.abspath(utils.__file__)) == ref_dir, utils.__file__

    def cpu_tensor(*args, **kwargs):  # 4
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.tensor(*args, **kwargs)

    class TorchForUtils(types.ModuleType):  # torch itself, but for `tensor`
        def __getattr__(self, name):
            return getattr(torch, name)
    utils.torch = TorchForUtils("torch")
    utils.torch.tensor = cpu_tensor

    if not hasattr(utils, "reduce_across_processes"):  # 5
        def reduce_across_processes(val):
            t = torch.tensor(val)
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
                dist.all_reduce(t)
            return t
        utils.reduce_across_processes = reduce_across_processes

    log_every = utils.MetricLogger.log_every
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def timed_log_every(self, iterable, print_freq, header=None):  # 6
        if not str(header).startswith("Epoch"):
            yield from log_every(self, iterable, print_freq, header)
            return
        start, images = time.perf_counter(), 0
        for obj in log_every(self, iterable, print_freq, header):
            images += len(obj[0])
            yield obj
        seconds = time.perf_counter() - start
        if rank == 0:
            builtins.print(f"{EPOCH_LINE} {header} seconds {seconds:.4f} images {images * world}", flush=True)
    utils.MetricLogger.log_every = timed_log_every

    sys.argv = [train_py, *flags]
    runpy.run_path(train_py, run_name="__main__")


if __name__ == "__main__":
    reference_worker(sys.argv[1], sys.argv[2:])
