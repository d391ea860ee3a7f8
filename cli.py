"""What the command-line programs share (generate.py, quant/calibrate.py, quant/eval.py, bench/).

`UserError` is the one exception type for problems a user can fix (a bad checkpoint, prompt,
calibration file or flag), raised wherever they are found, model loading and the Python API
included; `run_cli` turns it into one `error:` line on stderr and exit status 1, or 2 for a
`FlagError` (a flag the loaded model cannot take). Flags argparse rejects exit with 2 as well.
`read_file` is the one place a user's file is read, so every unreadable file is reported alike.
Under torchrun every rank runs the same command and meets the same errors (engine/parallel.py
agree makes one rank's error every rank's), so only rank 0 prints them.
Imports nothing heavy, so that `--help` and bad flags answer before torch loads.
"""
import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# OpenMP threads waiting for work sleep rather than spin. On a busy machine (2 cores, load 18)
# spinning threads held the cores the working ones needed: SmolLM2 decode at 4K with 2 threads,
# fp32 cache 801 -> 345 ms, skvq-k2v1.5 2,680 -> 320 ms (bench/RESULTS.md). OpenMP reads it when
# torch loads it: the programs import this module before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with `exit_status`."""

    exit_status = 1


class FlagError(UserError):
    """A flag that turns out wrong once the model is known (--max-context, --prompt-tokens, --kv)."""

    exit_status = 2


def run_cli(main):
    """Run a command-line entry point: a UserError becomes one `error:` line and its exit status."""
    try:
        main()
    except UserError as e:
        if speaks():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)


def world_mismatch(tp: int, cp: int) -> str | None:
    """What is wrong with --tp and --cp for the processes torchrun started (one without it), or
    None: every rank is one process, so tp * cp must be their number."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp * cp == world:
        return None
    started = "one runs (no torchrun)" if world == 1 else f"torchrun started {world}"
    return f"--tp {tp} --cp {cp} needs {tp * cp} processes (torchrun --nproc-per-node {tp * cp} ...); {started}"


def speaks() -> bool:
    """Whether this process prints: one alone, or rank 0 of the processes torchrun started."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def reading(path: Path, what: str):
    """Reports an OSError while reading the user's file `path` (a `what`: "prompt file",
    "config.json", ...) as a UserError that names the file and the reason."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found")
    except IsADirectoryError:
        raise UserError(f"{path}: {what} is a directory")
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})")


def read_file(path: Path, what: str, limit: int | None = None, why: str = "") -> bytes:
    """The bytes of the user's file `path`. limit: refuse a file of more bytes, before reading it
    whole (it may be /dev/zero), saying `why` the limit."""
    with reading(path, what), open(path, "rb") as f:
        if limit is None:
            return f.read()
        chunks, size = [], 0  # in pieces: f.read(limit + 1) would allocate all of a huge limit at once
        while size <= limit and (chunk := f.read(min(limit + 1 - size, 2 ** 20))):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    if len(data) > limit:
        raise UserError(f"{path}: {what} is over {limit} bytes{why}")
    return data


def read_text(path: Path, what: str, limit: int | None = None, why: str = "") -> str:
    """read_file, decoded as UTF-8."""
    data = read_file(path, what, limit, why)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 ({e.reason} at byte {e.start})")


def readable(path: Path, what: str) -> Path:
    """`path`, once one byte of it has been read: for files a library opens itself (safetensors),
    whose own errors for an unreadable file mislead."""
    with reading(path, what), open(path, "rb") as f:
        f.read(1)
    return Path(path)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n" if speaks() else None)


def positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def add_parallel_flags(p: argparse.ArgumentParser):
    """--tp and --cp, as generate.py and the benchmarks take them (engine/parallel.py); the
    caller checks them against the processes started, world_mismatch."""
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel: ranks that split the heads (under torchrun)")
    p.add_argument("--cp", type=positive_int, default=1,
                   help="context parallel: ranks that split the history (under torchrun)")


def seed(s: str) -> int:
    """--seed: what torch.Generator.manual_seed accepts without overflowing, 0 to 2^64 - 1."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    if not 0 <= n < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be in 0 ... 2^64 - 1, got {n}")
    return n
