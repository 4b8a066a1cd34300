"""`python -m train <task> key=value ...` from a checkout; the installed console script is `dreamsteer`."""
import sys

from dreamsteer.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
