"""The `gsopt` console script: Ctrl-C while torch and the models load prints `interrupted`
and exits 130, as it does once a command runs (importing the gsopt package loads torch)."""

import sys


def main() -> int:
    try:
        from gsopt.cli import main as run
    except KeyboardInterrupt:
        print("gsopt: interrupted", file=sys.stderr)
        return 130
    return run()
