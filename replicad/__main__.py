"""`python -m replicad` runs the command-line interface (stop signals recorded first)."""

from replicad.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
