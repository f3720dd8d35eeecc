"""Report helpers shared by the benchmark scripts: command-line flags, machine facts, Markdown
tables of interleaved measurements (per-round ratios: median and range), <results_dir>/<name>.md
(bench/results/ by default), and a subprocess runner that timestamps the child's output as it
arrives."""
import argparse
import datetime
import json
import os
import platform
import re
import select
import shlex
import subprocess
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")
STARTED = time.perf_counter()


def parser(doc, repeats):
    """--quick (tiny sizes, one timed round), --repeats (timed rounds after one warm-up round) and
    --results_dir (where the report goes)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and one timed round: checks the script runs")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed rounds after the warm-up round (default {repeats}, "
                                                             "1 with --quick)")
    p.add_argument("--results_dir", default=RESULTS,
                   help="folder for the Markdown report (default bench/results, the committed reports: "
                        "point quick checks elsewhere)")
    p.set_defaults(default_repeats=repeats)
    return p


def repeats(args):
    return args.repeats or (1 if args.quick else args.default_repeats)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info():
    import PIL
    import torch
    import torchvision
    lines = [f"- command: `{shlex.join(['python', *sys.argv])}` (interpreter {sys.executable}, cwd {os.getcwd()})",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- CPU: {cpu_model()}; {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable); "
             f"load average at start {STARTED_LOAD}, at end {load_average()}",
             f"- torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), "
             f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}"]
    if "lightning" in sys.modules:
        lines[-1] += f", lightning {sys.modules['lightning'].__version__}"
    if IDLE_BEFORE is not None and IDLE_BEFORE < 0.9:
        lines.append(f"- **warning: the machine was not idle**: just before this script started, other processes "
                     f"kept {100 * (1 - IDLE_BEFORE):.0f}% of the CPU time busy; treat these numbers as noisy")
    lines.append(f"- total run time of this script: {time.perf_counter() - STARTED:.0f} s")
    return "\n".join(lines)


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "0 0 0"


def idle_fraction(seconds=0.5):
    """Share of all cores' time spent idle over `seconds` (from /proc/stat), or None."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(total1 - total0, 1)


STARTED_LOAD = load_average()
IDLE_BEFORE = idle_fraction()  # measured before the script does any work


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(out)


def summary(values, base_values):
    """(median value, median per-round ratio, 'min..max' of the ratios)."""
    ratios = [v / b for v, b in zip(values, base_values)]
    return float(np.median(values)), float(np.median(ratios)), f"{min(ratios):.3f}..{max(ratios):.3f}"


def fmt(value, digits=0):
    return f"{value:,.{digits}f}"


def write_report(results_dir, name, title, body, notes=()):
    """Print the report and write it to <results_dir>/<name>.md."""
    text = f"# {title}\n\n{machine_info()}\n\n{body}\n"
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text, flush=True)
    print(f"(written to {path})", flush=True)


def run_timed(command, patterns=(), stop_when=None, stop_signal=None, env=None, timeout=900):
    """Run `command` from the repository root with stdout+stderr merged, reading as it arrives.
    Returns dict(rc, wall, output, seen): seen[pattern] = seconds from start until the regex first
    matched the output. Once `stop_when(output)` is true the child is stopped: sent `stop_signal`
    and awaited (for a launcher that forwards it to workers in their own sessions, as torchrun's
    are), or else killed with its whole session. After `timeout` s it is killed."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
                             start_new_session=True)
    output, seen, stopped, deadline = "", {}, False, start + timeout
    while True:
        if not select.select([child.stdout], [], [], max(deadline - time.perf_counter(), 0))[0]:
            kill_session(child.pid)  # past the time limit
            stopped = True
            break
        chunk = os.read(child.stdout.fileno(), 65536)
        now = time.perf_counter() - start
        if not chunk:
            break
        output += chunk.decode(errors="replace")
        for pattern in patterns:
            if pattern not in seen and re.search(pattern, output):
                seen[pattern] = now
        if not stopped and stop_when and stop_when(output):
            stopped = True
            if stop_signal is None:
                kill_session(child.pid)
                break
            child.send_signal(stop_signal)  # then read on until it has exited
            deadline = time.perf_counter() + 120
    rc = child.wait()
    child.stdout.close()
    if rc != 0 and not stopped:
        raise RuntimeError(f"command failed (exit {rc}): {shlex.join(command)}\n{output[-3000:]}")
    return dict(rc=rc, wall=time.perf_counter() - start, output=output, seen=seen)


def kill_session(pid):
    """SIGKILL the session (process group) that run_timed started for its child `pid`."""
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass


def read_history(log_dir):
    with open(os.path.join(log_dir, "training_history.json")) as f:
        return json.load(f)
