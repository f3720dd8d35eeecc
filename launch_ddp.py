"""Launch train_ddp.py through torchrun on this machine, or as one node of several.

    python launch_ddp.py --num_gpus 2 --use_amp
    python launch_ddp.py --demo --num_gpus 2
    python launch_ddp.py --num_nodes 2 --node_rank 0 --master_addr 10.0.0.1 --num_gpus 8 ...

Launcher flags are below; every other flag goes to train_ddp.py unchanged (see its --help).
Without CUDA, --num_gpus N runs N CPU processes on the gloo backend.
"""
import argparse
import ctypes
import os
import shlex
import signal
import subprocess
import sys

from config import parse_args
from folders import check_data_folders
from errors import ConfigError, DataError

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_ddp.py")


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        add_help=False)
    launch = parser.add_argument_group("launcher (everything else goes to train_ddp.py)")
    launch.add_argument("-h", "--help", action="store_true", help="show this help and train_ddp.py's flags")
    launch.add_argument("--num_gpus", type=int, default=1,
                        help="processes on this machine: one per GPU, or CPU processes without CUDA")
    launch.add_argument("--num_nodes", type=int, default=1, help="machines in the job")
    launch.add_argument("--node_rank", type=int, default=0, help="this machine's index, 0..num_nodes-1")
    launch.add_argument("--master_addr", default="127.0.0.1",
                        help="address of node 0 (c10d rendezvous host) for multi-node jobs")
    launch.add_argument("--master_port", type=int, default=29500, help="rendezvous port on master_addr")
    launch.add_argument("--max_restarts", type=int, default=0,
                        help="torchrun restarts of the whole worker group after a failure; "
                             "turns on --auto_resume so a restart continues from checkpoint_latest.pth")
    return parser


def cuda_device_count():
    """The CUDA devices the workers will see (CUDA_VISIBLE_DEVICES applied), asked of the driver.

    The launcher never imports torch: that would add seconds to every start, and torchrun and the
    workers import it anyway. ROCm machines (no libcuda) fall back to asking torch.
    """
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        if not os.path.exists("/dev/kfd"):
            return 0
        import torch
        return torch.cuda.device_count()
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def torchrun_command(args, train_argv):
    """The exact command: torchrun as a module of this interpreter, so the same environment runs it."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.num_gpus}"]
    if args.num_nodes > 1:
        command += [f"--nnodes={args.num_nodes}", f"--node_rank={args.node_rank}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={args.master_addr}:{args.master_port}",
                    f"--rdzv_id=launch_ddp_{args.master_port}"]
    else:
        command += ["--standalone"]
    if args.max_restarts:
        command += [f"--max_restarts={args.max_restarts}"]
        if "--auto_resume" not in train_argv:  # a restarted worker group continues from its checkpoint
            train_argv = train_argv + ["--auto_resume"]
    return command + [TRAIN_SCRIPT] + train_argv


def check_launch(args, train_argv, visible_gpus):
    """Refuse bad flags and data before anything spawns: one message instead of N tracebacks."""
    if args.num_gpus < 1:
        raise ConfigError(f"--num_gpus must be at least 1, got {args.num_gpus}")
    if args.num_nodes < 1 or not 0 <= args.node_rank < args.num_nodes:
        raise ConfigError(f"--node_rank must be in 0..{args.num_nodes - 1}, got {args.node_rank}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max_restarts must be 0 or more, got {args.max_restarts}")
    if visible_gpus and args.num_gpus > visible_gpus:
        raise ConfigError(f"--num_gpus {args.num_gpus} but only {visible_gpus} CUDA device(s) are visible; "
                          f"use --num_gpus {visible_gpus} or fewer (check CUDA_VISIBLE_DEVICES)")
    train_args = parse_args(train_argv)
    if not train_args.demo:
        check_data_folders(train_args.train_dir, train_args.val_dir)


def run(command):
    """Run torchrun, passing SIGINT/SIGTERM on to it, and return its exit code."""
    child = subprocess.Popen(command)

    def forward(signum, _frame):
        child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # raised if SIGINT lands before the handler is set
            child.send_signal(signal.SIGINT)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, train_argv = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print("\ntrain_ddp.py flags:\n")
        subprocess.run([sys.executable, TRAIN_SCRIPT, "--help"])
        return 0
    visible_gpus = cuda_device_count()
    try:
        check_launch(args, train_argv, visible_gpus)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not visible_gpus:
        print(f"No CUDA device: running {args.num_gpus} CPU process(es) on the gloo backend.", flush=True)
    command = torchrun_command(args, train_argv)
    print("Running:", shlex.join(command), flush=True)
    return run(command)


if __name__ == "__main__":
    sys.exit(main())
