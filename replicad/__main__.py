"""`python -m replicad` runs the command-line interface."""

from replicad.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
