"""Building and loading the C kernels of the CPU path (`kernels`: kernels/streaming.py's
packed_history.c and kernels/rows.py's rows.c, one library), so that no file but the one built
from our sources is ever loaded.

The shared object is cached, one per source, compiler, flags and CPU, in $XDG_CACHE_HOME/kvq
(~/.cache/kvq). Loading a shared object runs its code, so a file there is loaded only
- from a folder that is this user's and that no one else can write to (so no one else can plant
  or swap a file in it), and
- if the sha256 of its bytes is the one recorded beside it (NAME.so.sha256) when it was built:
  a truncated, damaged or foreign file is rebuilt rather than loaded (a truncated one would crash
  the process with SIGBUS once mapped).
It is built into a temporary file and renamed into place, so that a process building it at the
same time never sees half a file. Whatever fails (no usable folder, a compiler error, a library
without the symbols), `load` returns None after a one-line note on stderr, and the torch path runs.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from cli import speaks

SOURCES = ["packed_history.c", "rows.c"]
SYMBOLS = ["attend_packed", "attend_full", "write_token", "linear_rows", "rms_norm_rows"]
# Sums reassociated (fp32 either way; the tests' tolerance): a running sum or maximum over a block vectorizes.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]


@functools.cache
def kernels():
    """SOURCES built into one library, once per source, compiler, flags and CPU (`load`: where,
    and what is checked before it is loaded); None where there is no C compiler, or the build or
    the load fails: the torch path then runs."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    sources = [Path(__file__).with_name(name) for name in SOURCES]
    cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")][:1] \
        if Path("/proc/cpuinfo").exists() else []
    key = hashlib.sha256("\n".join([*(source.read_text() for source in sources), compiler, *FLAGS, *cpu]).encode())
    return load("cpu-kernels", [compiler, *FLAGS, *map(str, sources), "-lm", "-o"], key.hexdigest()[:16], SYMBOLS)


def load(name: str, command: list[str], key: str, symbols: list[str]):
    """The library built by `command` (a compiler call, its output file to come last), cached
    under `name`-`key`.so and checked as the module docstring says; None where it cannot be had
    (with a note on stderr)."""
    try:
        folder = cache_folder()
        library = folder / f"{name}-{key}.so"
        digest = recorded_digest(library)
        if digest is None or digest != file_digest(library):
            digest = build(command, library)
        if file_digest(library) != digest:  # replaced since (by a concurrent build): not the file we checked
            raise OSError(f"{library} changed while it was being checked")
        loaded = ctypes.CDLL(str(library))
        missing = [symbol for symbol in symbols if not hasattr(loaded, symbol)]
        if missing:
            raise OSError(f"{library} lacks {', '.join(missing)}")
        return loaded
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # RuntimeError: no home folder
        if speaks():
            print(f"note: the C kernels ({name}) are not used, torch runs in their place ({e})", file=sys.stderr)
        return None


def cache_folder() -> Path:
    """$XDG_CACHE_HOME/kvq or ~/.cache/kvq, made if need be; OSError unless it is a folder of
    this user's that no one else can write to."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvq"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.stat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{folder} is not a folder")
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{folder} is not this user's alone (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)})")
    return folder


def recorded_digest(library: Path) -> str | None:
    """The sha256 recorded beside `library` when it was built, None where there is none."""
    record = library.with_name(library.name + ".sha256")
    try:
        return record.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def build(command: list[str], library: Path) -> str:
    """Runs the compiler `command` into a temporary file beside `library`, then renames it and the
    record of its sha256 into place. Returns the sha256; OSError where the compiler fails."""
    partial = library.with_name(f".{library.name}.{os.getpid()}.tmp")
    try:
        built = subprocess.run([*command, str(partial)], capture_output=True, text=True, check=False)
        if built.returncode:
            raise OSError(f"{command[0]} failed: {(built.stderr.strip().splitlines() or ['?'])[-1]}")
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        partial.rename(library)
        partial.write_text(digest + "\n")
        partial.rename(library.with_name(library.name + ".sha256"))
        return digest
    finally:
        partial.unlink(missing_ok=True)
