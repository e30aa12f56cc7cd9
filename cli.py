"""What every command-line entry point shares: setting up the process, and how it exits.

    def main(argv=None):
        return cli.run(body, argv)         # body(argv) -> an exit code; errors become one line and a code
    ...
    cli.setup()                            # main.py, eval.py: the compile cache and malloc tuning
    cli.setup(training=True)               # train.py, bench.py's training modes: also the XLA:CPU flag
    cli.initialize_distributed()           # train.py: join the other processes of a multi-host launch
    args = cli.parse_args(parser, argv)    # argparse, with a did-you-mean for a mistyped flag (exit 2)
    with cli.stop_requests(say, saved_so_far) as stop:   # train.py's loop: stop.is_set() once a signal came

Exit codes, the same for main.py, train.py, data.py, weights.py and bench.py:
    0    done
    1    failed: the work started and could not finish (a network, a damaged file, a non-finite loss, memory, ...)
    2    bad usage: the command line or a config file asked for something that cannot be done as asked
         (UsageError, and argparse's own errors)
    130  interrupted (Ctrl-C), as a shell reports a process stopped by SIGINT; train.py's first Ctrl-C saves a
         checkpoint and still exits 130, since the run did not finish, and likewise 128 + the signal for the
         SIGTERM (143), SIGUSR1 (138) or SIGHUP (129) of a scheduler
Every error is printed as one line, "error: ...", on stderr: no traceback.
"""
import argparse
import contextlib
import ctypes
import difflib
import os
import platform
import signal
import sys
import threading

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """The command line or a config file asked for something that cannot be done as asked (exit code 2)."""


class Interrupted(KeyboardInterrupt):
    """A stop at once, by a signal (exit code: code, 128 + the signal)."""

    def __init__(self, message, code=INTERRUPTED):
        super().__init__(message)
        self.code = code


def run(body, argv: list[str] | None = None) -> int:
    """body(argv) -> exit code (None: 0), with every expected error turned into one line and its exit code."""
    try:
        return body(sys.argv[1:] if argv is None else argv) or OK
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE
    except (ValueError, OSError, FloatingPointError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt as e:
        print(f"error: {str(e) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return getattr(e, "code", INTERRUPTED)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args(argv), naming the closest flag when one is mistyped (--promt, --top-k): argparse's own
    message, exit code 2, and a did-you-mean as train.py gives for its config keys."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].partition("=")[0]
        flags = [option for action in parser._actions for option in action.option_strings]  # argparse keeps no other
        close = difflib.get_close_matches(flag.replace("-", "_").replace("__", "--", 1), flags, n=1, cutoff=0.7)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" (did you mean {close[0]}?)" if close
                                                                       else ""))
    return args


def setup(training: bool = False) -> None:
    """Set up this process for gptjax's work; call before jax runs anything."""
    if training:
        prefer_eigen_dots_on_cpu()
    enable_compilation_cache()
    keep_freed_memory()


def enable_compilation_cache(path=None):
    """Keep compiled programs on disk, so a new process skips most of the compile time of generation and training.
    path defaults to $GPTJAX_COMPILATION_CACHE, else ~/.cache/gptjax/jax."""
    import jax  # here, not at the top: data.py's worker processes import this module and need no jax (~200 MB each)
    path = path or os.environ.get("GPTJAX_COMPILATION_CACHE") or os.path.expanduser("~/.cache/gptjax/jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def keep_freed_memory():
    """Have glibc's malloc keep freed blocks of up to 1 GiB for reuse instead of handing them back to the system.
    XLA:CPU allocates the buffers of each call anew, and memory handed back is faulted in again page by page: a small
    model's training step took 12,500 page faults (~35 ms of system time, a third of the step; 58 -> 41 ms without
    them), and 124M decoding at batch 8 ran 12% faster without its faults. The price: the process keeps its peak
    memory. Linux with glibc only (elsewhere nothing is done)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)  # serve blocks below this from the heap, not from fresh mmaps
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and never shrink the heap


def prefer_eigen_dots_on_cpu():
    """Have XLA:CPU run matrix products with its Eigen kernels instead of handing each to YNNPACK. Measured on a 2-core
    AMD EPYC (jax 0.10.2), in alternating processes: the baby GPT's training step is 10-20% faster (its [16384, 384]
    x [384, 1536] products and batched attention products run faster in Eigen), the small config's unchanged. A flag a
    user put in XLA_FLAGS for the same option wins. It must run before jax starts its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=-individual_dot".strip()


def initialize_distributed():
    """jax.distributed.initialize() when this process is one of several: SLURM or Open MPI with more than one task
    (detected by jax), or JAX_COORDINATOR_ADDRESS set with JAX_NUM_PROCESSES and JAX_PROCESS_ID. Once a process.
    GPTJAX_HEARTBEAT_TIMEOUT (seconds, jax's default 100) is how long the others wait on a process that stopped
    answering before they stop too."""
    import jax
    env = os.environ
    if jax.distributed.is_initialized():
        return
    try:
        timeout = {"heartbeat_timeout_seconds": int(env["GPTJAX_HEARTBEAT_TIMEOUT"])} \
            if env.get("GPTJAX_HEARTBEAT_TIMEOUT") else {}
        if "JAX_COORDINATOR_ADDRESS" in env:
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                       int(env["JAX_PROCESS_ID"]), **timeout)
        elif int(env.get("SLURM_NTASKS", 1)) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
            jax.distributed.initialize(**timeout)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot join the other processes of this launch ({e}): set JAX_COORDINATOR_ADDRESS, "
                         f"JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run a single process") from None


# ----------------------------------------------------------------------------------- stopping on a signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # Ctrl-C, and what schedulers send


def signal_name(signum):
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class StopRequest:
    """Set by the first of STOP_SIGNALS: the loop stops after the current step and saves a checkpoint. Once the loop
    has ended (saved), there is nothing left to stop: a further signal is let pass while the process closes."""

    def __init__(self):
        self.signum = None
        self.loop_ended = False

    def is_set(self):
        return self.signum is not None


@contextlib.contextmanager
def stop_requests(say, saved_so_far, keep=False):
    """-> a StopRequest that SIGINT (Ctrl-C), SIGTERM, SIGUSR1 or SIGHUP (a scheduler's warning before it kills a
    job: SLURM, Kubernetes, spot machines) sets. A second signal stops at once, saving nothing (Interrupted, exit
    128 + the signal). say(text) acknowledges the first; saved_so_far() says what a stop at once leaves. keep: once
    the loop has ended, the handler stays (for a process that ends with the run: the default handler would raise
    inside whatever clean-up a late signal meets)."""
    stop = StopRequest()

    def on_signal(signum, frame):
        name = signal_name(signum)
        if stop.loop_ended:  # the state is saved and the process is closing: an exception now would only print a
            return           # traceback from wherever it lands (tqdm's clean-up, say)
        if stop.is_set():
            raise Interrupted(f"stopped at once by a second {name}; nothing was saved ({saved_so_far()})", 128 + signum)
        stop.signum = signum
        say(f"{name}: stopping after this step and saving what it trained ({name} again: stop now, save nothing)")

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS} if main_thread else {}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            if not (keep and stop.loop_ended):
                signal.signal(signum, handler)
