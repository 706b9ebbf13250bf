"""``python -m moecompress``: the command line (what ``torchrun ... -m moecompress compress`` starts on every rank)."""

import sys

from moecompress.cli import main

if __name__ == "__main__":
    sys.exit(main())
