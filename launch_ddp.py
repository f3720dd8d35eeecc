"""Launch train_ddp.py through torchrun on this machine, or as one node of several.

    python launch_ddp.py --num_gpus 2 --use_amp
    python launch_ddp.py --demo --num_gpus 2
    python launch_ddp.py --num_nodes 2 --node_rank 0 --master_addr 10.0.0.1 --num_gpus 8 ...

Launcher flags are below; every other flag goes to train_ddp.py unchanged (see its --help).
Without CUDA, --num_gpus N runs N CPU processes on the gloo backend.
"""
import argparse
import ctypes
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from config import parse_args
from core.errors import USER_ERRORS, CheckpointError, ConfigError
from inputs.label_files import check_run_data

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
    train_args = parse_args(train_argv, other_flags=list(build_parser()._option_string_actions))
    check_run_data(train_args)
    if train_args.resume and not os.path.isfile(train_args.resume):
        raise CheckpointError(f"checkpoint not found: {train_args.resume}")


# The signals torchrun's agent turns into a shutdown of its workers (TORCHELASTIC_SIGNALS_TO_HANDLE).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception, another exception occurred:",
           "The above exception was the direct cause of the following exception:")
ERROR_LINE = re.compile(rb"\[rank \d+\] error: ")  # train_ddp.py's report_error, under torchrun
PEER_LOSS = b"another process of this job stopped or failed"  # its line from a rank that only lost a peer
TORCHRUN_LOG = re.compile(rb"[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +(\d+) \S+:\d+\] ")
# Where a recognised line starts glued to an unfinished one (a progress bar has no line end).
LINE_START = re.compile(ERROR_LINE.pattern + b"|" + TORCHRUN_LOG.pattern.replace(b"(", b"(?:", 1))
CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"
QUIET_SECONDS = 0.2  # a traceback is written in one go: this long without output ends it
STRAGGLER_SECONDS = 5  # how long to relay the output of processes that outlive torchrun


def torchrun_env(num_gpus, error_file):
    """This environment, plus what lets the relay judge torchrun's end and keeps its output short."""
    env = dict(os.environ)
    env.setdefault("TORCHELASTIC_ERROR_FILE", error_file)  # torchrun copies the root cause's error there
    if num_gpus > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets by itself, less its four-line notice
    try:  # the progress bar, written to a pipe now, still fits the terminal (tqdm reads these)
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
        env.setdefault("COLUMNS", str(columns))
        env.setdefault("LINES", str(lines))
    except (OSError, ValueError):
        pass
    return env


def run(command, num_gpus):
    """Run torchrun and return the job's exit code.

    torchrun runs in a session of its own, so a terminal's Ctrl-C reaches only the launcher, which
    passes the first SIGINT/SIGTERM/SIGHUP/SIGQUIT on to torchrun once: torchrun's agent forwards it
    to the workers, which save and exit. (Two signals made the agent give up waiting for them, with
    chained tracebacks.) torchrun's stderr, which the workers share, goes through a Relay."""
    with tempfile.TemporaryDirectory(prefix="launch_ddp_") as scratch:
        env = torchrun_env(num_gpus, os.path.join(scratch, "error.json"))
        received, handlers = [], {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        wakeup = signal.set_wakeup_fd(wake_write)  # a signal ends the wait in select at once
        try:
            for signum, handler in handlers.items():
                # Under nohup SIGHUP stays ignored; a SIGINT/SIGTERM ignored by whoever started the
                # launcher (a shell's background job, a wrapper) still stops the job, as it does the workers.
                if handler != signal.SIG_IGN or signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, lambda signum, _frame: received.append(signum))
            child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
            relay = Relay(sys.stderr.buffer, child.pid)
            pump(child, relay, received, wake_read)
            return relay.exit_code(child.wait(), root_cause(env["TORCHELASTIC_ERROR_FILE"]))
        finally:
            signal.set_wakeup_fd(wakeup)
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
            os.close(wake_read)
            os.close(wake_write)


def pump(child, relay, received, wake):
    """Relay torchrun's stderr until it closes, forwarding the first stop signal. Once torchrun has
    exited, processes that inherited its stderr (loader workers) get until they fall quiet."""
    stderr, exited = child.stderr.fileno(), None
    while exited is None or time.monotonic() < exited + STRAGGLER_SECONDS:
        if received and relay.signal is None:
            relay.signal = received[0]
            child.send_signal(relay.signal)
        ready = select.select([stderr, wake], [], [], QUIET_SECONDS)[0]
        if wake in ready:
            os.read(wake, 64)
        if stderr in ready:
            data = os.read(stderr, 1 << 16)
            if not data:
                break
            relay.feed(data)
        elif not ready:
            relay.quiet()
            if exited is not None:
                break
        if exited is None and child.poll() is not None:
            exited = time.monotonic()
    relay.close()


def root_cause(error_file):
    """The message of the failure torchrun names as the root cause (it copies that worker's error
    file to its own when workers fail); None when there is none."""
    try:
        with open(error_file) as f:
            message = json.load(f)["message"]
        return message["message"] if isinstance(message, dict) else message
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Relay:
    """torchrun's stderr, shared with its workers, on its way to the launcher's. Everything passes
    unchanged and at once (progress bars too), except:
    - an `error:` line another rank already printed (every rank that meets a bad input says so);
    - what only restates how the job ended. Once a worker has printed an error, a rank has said it
      lost a peer, or a stop signal was forwarded, torchrun's own log lines, its final traceback
      (the ChildFailedError report, or its agent's SignalException) and the peer-loss lines are held
      back; `exit_code` drops them when a worker's error or the signal explains the end, and
      prints them otherwise (a crash, a killed worker)."""

    def __init__(self, out, torchrun_pid):
        self.out, self.torchrun_pid = out, torchrun_pid
        self.signal = None  # the stop signal forwarded to torchrun
        self.errors = []  # the messages of the error lines shown
        self.held = []
        self.block = None  # the lines of a traceback being read, until its exception line is known
        self.exception = None  # that traceback's last exception line
        self.report = False  # torchrun's final report has begun: the rest of the output is held
        self.partial = b""
        self.midline = False  # whether the last output ended without a line end (a progress bar)

    def feed(self, data):
        *lines, self.partial = re.split(rb"(?<=[\r\n])", self.partial + data)
        for raw in lines:
            self.line(raw)
        if self.partial and not (self.block or self.report or LINE_START.search(self.partial)
                                 or self.partial.startswith(b"Traceback")):
            self.write(self.partial)  # a progress bar: show it now
            self.partial = b""

    def quiet(self):
        if self.block and self.exception is not None:
            self.end_block()

    def close(self):
        if self.partial:
            self.line(self.partial)
            self.partial = b""
        if self.block:
            self.end_block()

    def line(self, raw):
        if self.report:
            self.held.append(raw)
            return
        text = raw.decode(errors="replace").rstrip("\r\n")
        if self.block is not None:
            if self.continues(text):
                self.block.append(raw)
                if (self.exception or "").startswith(CHILD_FAILED):
                    self.held += self.block
                    self.block, self.report = None, True
                return
            self.end_block()
        glued = LINE_START.search(raw, 1)
        if glued:  # a recognised line after a progress bar: the bar goes out as it is
            self.write(raw[:glued.start()])
            raw, text = raw[glued.start():], text[glued.start():]
        if text == TRACEBACK:
            self.block, self.exception = [raw], None
            return
        error, log = ERROR_LINE.match(raw), TORCHRUN_LOG.match(raw)
        if error:
            message = raw[error.end():].rstrip(b"\r\n")
            if message.startswith(PEER_LOSS):
                self.held.append(raw)
            elif message not in self.errors:
                self.errors.append(message)
                self.write(b"\n" if self.midline else b"", raw)  # on a line of its own, not after a progress bar
        elif log and int(log[1]) == self.torchrun_pid and (self.errors or self.held or self.signal):
            self.held.append(raw)
        else:
            self.write(raw)

    def continues(self, text):
        """Whether a line belongs to the traceback being read (its frames, a chained one)."""
        if text == TRACEBACK:
            self.exception = None
        elif text.strip() and text not in CHAINED and not text.startswith((" ", "\t")):
            if self.exception is not None:
                return False
            self.exception = text
        return True

    def end_block(self):
        block, exception, self.block = self.block, self.exception or "", None
        agent_stopped = f"torch.distributed.elastic.multiprocessing.api.SignalException: Process {self.torchrun_pid} "
        if exception.startswith(agent_stopped) or (exception == "KeyboardInterrupt" and self.signal == signal.SIGINT):
            self.held += block  # torchrun stopped by the signal forwarded (before its handler: KeyboardInterrupt)
        else:
            self.write(*block)

    def write(self, *chunks):
        for chunk in chunks:
            self.out.write(chunk)
            self.midline = not chunk.endswith(b"\n") if chunk else self.midline
        self.out.flush()

    def exit_code(self, returncode, root_cause):
        """The job's exit code: 128+signal for a stop signal, 2 when a worker's error line (a user
        error, whatever code its rank exited with) is torchrun's root cause, else torchrun's."""
        if returncode != 0 and self.signal is not None:
            return 2 if self.errors else 128 + self.signal
        if returncode != 0 and root_cause and root_cause.startswith("error: ") and \
                root_cause[len("error: "):].strip().encode() in self.errors:
            return 2
        self.write(*self.held)
        return returncode


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
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not visible_gpus:
        print(f"No CUDA device: running {args.num_gpus} CPU process(es) on the gloo backend.", flush=True)
    command = torchrun_command(args, train_argv)
    print("Running:", shlex.join(command), flush=True)
    return run(command, args.num_gpus)


if __name__ == "__main__":
    sys.exit(main())
