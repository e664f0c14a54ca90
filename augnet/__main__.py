"""``python -m augnet``: the same command line as the ``augnet`` script."""

from augnet._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
