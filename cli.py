"""What the command-line programs share (generate.py, quant/calibrate.py, quant/eval.py, bench/).

`UserError` is the one exception type for problems a user can fix (a bad checkpoint, prompt,
calibration file or flag), raised wherever they are found, model loading and the Python API
included; `run_cli` turns it into one `error:` line on stderr and exit status 1, or 2 for a
`FlagError` (a flag the loaded model cannot take). Flags argparse rejects exit with 2 as well.
`run_cli` also ends Ctrl-C (one line, exit 130), a reader that closed the pipe (quietly, as a
process killed by SIGPIPE would: exit 141) and a failed write (one line).
`read_file` is the one place a user's file is read, so every unreadable file is reported alike;
`read_json` the one place a JSON file is, with bounds on its size and depth.
Under torchrun every rank runs the same command and meets the same errors (engine/parallel.py
agree makes one rank's error every rank's), so only rank 0 prints them; `launch` reads torchrun's
variables, checked.
Imports nothing heavy, so that `--help` and bad flags answer before torch loads.
"""
import argparse
import errno
import json
import os
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

JSON_BYTES = 64 << 20  # the largest JSON file read: Hugging Face tokenizer.json files reach about 35 MB

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
    """Run a command-line entry point: a UserError becomes one `error:` line and its exit status;
    Ctrl-C, a closed pipe and a failed write end it as the module docstring says."""
    if sys.stderr is None:  # started with stderr closed (2>&-): print(file=None) would write to stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        sys.stderr = open(2, "w")
    try:
        if sys.stdout is None:  # started with stdout closed (>&-): the output would be lost
            raise UserError("stdout is closed: nowhere to write the output")
        main()
        sys.stdout.flush()
    except UserError as e:
        fail(str(e), e.exit_status)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except BrokenPipeError:  # the reader is gone (| head): nothing to say, nowhere to say it
        discard_stdout()
        sys.exit(141)
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        discard_stdout()
        fail(f"{e.filename}: {e.strerror}" if e.filename else f"cannot write to stdout ({e.strerror})", 1)


# What a write to a full, broken or read-only destination raises (a bug raises something else).
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EBADF, errno.EROFS, errno.EFBIG, errno.EACCES}


def fail(message: str, status: int):
    if speaks() and sys.stderr is not None:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def discard_stdout():
    """Points stdout at /dev/null, so that the interpreter's last flush of what is still buffered
    neither fails nor prints a second message."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@dataclass(frozen=True)
class Launch:
    """This process's place among those torchrun started (one alone: the defaults)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    master_addr: str = ""
    master_port: int = 0


def launch() -> Launch:
    """torchrun's variables, checked: WORLD_SIZE decides. Without it this process is alone (a stray
    RANK or LOCAL_RANK is ignored); with it, RANK, MASTER_ADDR and MASTER_PORT must be there too
    (torch.distributed's env:// needs them) and every number in range. A UserError says what is wrong."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return Launch()
    world = env_int("WORLD_SIZE", 1)
    if world == 1:
        return Launch()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE={world} without {', '.join(missing)}: start the processes with torchrun "
                        "(torchrun --nproc-per-node N ...), or unset WORLD_SIZE for one")
    rank = env_int("RANK", 0, world - 1)
    local_world = env_int("LOCAL_WORLD_SIZE", 1, world) if "LOCAL_WORLD_SIZE" in env else 1
    local_rank = env_int("LOCAL_RANK", 0, world - 1) if "LOCAL_RANK" in env else 0
    return Launch(rank, world, local_rank, local_world, env["MASTER_ADDR"], env_int("MASTER_PORT", 1, 65535))


def env_int(name: str, low: int, high: int = 2 ** 31 - 1) -> int:
    """The environment variable `name` as an integer in low ... high, or a UserError."""
    value = os.environ[name]
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} in the environment is not an integer")
    if not low <= n <= high:
        raise UserError(f"{name}={n} in the environment is outside {low} ... {high}")
    return n


def world_mismatch(tp: int, cp: int) -> str | None:
    """What is wrong with --tp and --cp for the processes torchrun started (one without it), or
    with torchrun's variables; None if nothing: every rank is one process, so tp * cp must be their number."""
    try:
        world = launch().world
    except UserError as e:
        return str(e)
    if tp * cp == world:
        return None
    started = "one runs (no torchrun)" if world == 1 else f"torchrun started {world}"
    return f"--tp {tp} --cp {cp} needs {tp * cp} processes (torchrun --nproc-per-node {tp * cp} ...); {started}"


def speaks() -> bool:
    """Whether this process prints: one alone, or rank 0 of the processes torchrun started (and
    any process whose torchrun variables are wrong: it reports that)."""
    try:
        return launch().rank == 0
    except UserError:
        return True


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


def open_file(path: Path, what: str, regular: bool):
    """`path` opened for reading without waiting for a writer: a FIFO with none reads as empty
    rather than blocking forever (a pipe with one, as `<(...)` gives, reads as usual). regular:
    refuse anything but a regular file (a checkpoint's files are)."""
    with reading(path, what):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        mode = os.fstat(fd).st_mode
        if regular and not stat.S_ISREG(mode):
            os.close(fd)
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(path)
            raise UserError(f"{path}: {what} is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb")


def read_file(path: Path, what: str, limit: int | None = None, why: str = "", regular: bool = False) -> bytes:
    """The bytes of the user's file `path`. limit: refuse a file of more bytes, before reading it
    whole (it may be /dev/zero), saying `why` the limit. regular: only a regular file (a
    checkpoint's), not whatever the user names (a prompt from a pipe, `<(...)`)."""
    with reading(path, what), open_file(path, what, regular) as f:
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


def read_text(path: Path, what: str, limit: int | None = None, why: str = "", regular: bool = False) -> str:
    """read_file, decoded as UTF-8."""
    data = read_file(path, what, limit, why, regular)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: {what} is not UTF-8 ({e.reason} at byte {e.start})")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from the user's file, or one UserError naming the file and why: over
    JSON_BYTES, not JSON, nested past Python's recursion limit (about 1000 levels), not an object."""
    text = read_text(path, what, JSON_BYTES, regular=True)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})")
    except RecursionError:
        raise UserError(f"{path}: {what} is nested too deeply to be a checkpoint's JSON")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


def readable(path: Path, what: str) -> Path:
    """`path`, once it is known to be a regular file and one byte of it has been read: for files a
    library opens itself (safetensors), whose own errors for an unreadable file mislead."""
    with reading(path, what), open_file(path, what, regular=True) as f:
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


def comma_list(item_type, allowed=None):
    """An argparse type: comma-separated items of item_type, each in `allowed` if given."""
    def parse(text: str) -> list:
        items = [item_type(x) for x in text.split(",")]
        unknown = [x for x in items if allowed is not None and x not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, unknown))} (from {', '.join(allowed)})")
        return items
    return parse


def non_negative_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


positive_ints = comma_list(positive_int)  # the benchmarks' --gpus, --threads


def positive_number(s: str) -> float:
    """A finite number > 0 (bench/memory.py's --plan-gib)."""
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number")
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s}")
    return x


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
