"""`python -m safekeel ...` is the `safekeel` console script."""

from safekeel.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())  # its exit code: 2 for a user's mistake
