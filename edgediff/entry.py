"""The ``edgediff`` console script. The CLI's modules take a moment to import; a ^C in that
moment ends the command with the same one line as later ones, not a traceback (SIGTERM there
ends the process by its default action: nothing has been written yet)."""
import sys


def main():
    try:
        from edgediff.cli import console
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    console()
