"""`python -m train --config train/configs/digits_deformed.py [--set key=value ...]`."""

import sys

from train.main import main

if __name__ == "__main__":
    sys.exit(main())
