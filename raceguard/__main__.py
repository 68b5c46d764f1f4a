"""The ``raceguard`` console script and ``python -m raceguard``.

The target's process is started first (:mod:`raceguard.process.prestart`, which imports nothing
heavy), then the command line interface is imported and run: the child imports torch while click
parses the command line.
"""

import sys


def main() -> None:
    from raceguard.process import prestart

    prestart.start_for(sys.argv[1:])
    from raceguard.cli import main as cli_main

    cli_main(prog_name="raceguard")


if __name__ == "__main__":
    main()
