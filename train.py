#!/usr/bin/env python
"""Train a TSHSR model: ``python train.py --help`` (the same as ``tshsr-train``; see tshsr_train)."""

import sys

from tshsr_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
