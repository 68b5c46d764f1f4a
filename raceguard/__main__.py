"""The ``raceguard`` console script and ``python -m raceguard``.

The target's process is started first (:mod:`raceguard.process.prestart`, which imports nothing
heavy), then the command line interface is imported and run: the child imports torch while click
parses the command line.
"""

import sys


TARGET_COMMANDS = ("check", "stress", "replay")


def main() -> None:
    try:
        from raceguard.process import prestart

        prestart.start_for(sys.argv[1:])
        from raceguard.cli import main as cli_main
    except KeyboardInterrupt:
        # Ctrl-C while raceguard itself starts (under ``check`` the supervisor notes it instead
        # and reports it once it waits for the target): one line, the shell's 128 + SIGINT.
        runs_target = sys.argv[1:2] and sys.argv[1] in TARGET_COMMANDS
        sys.stderr.write("raceguard: interrupted before the target started\n" if runs_target else "raceguard: interrupted\n")
        sys.exit(130)
    cli_main(prog_name="raceguard")


if __name__ == "__main__":
    main()
