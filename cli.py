"""What the command-line programs share (generate.py, quant/calibrate.py, quant/eval.py, bench/).

`UserError` is the one exception type for problems a user can fix (a bad checkpoint, prompt,
flag or calibration file), raised wherever they are found, model loading included; `run_cli`
turns it into one `error:` line on stderr and exit status 1. Flags argparse rejects exit with 2.
Imports nothing heavy, so that `--help` and bad flags answer before torch loads.
"""
import argparse
import sys


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as one line."""


def run_cli(main):
    """Run a command-line entry point: a UserError becomes one `error:` line and exit status 1."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n
