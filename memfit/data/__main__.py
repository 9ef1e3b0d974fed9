"""``python -m memfit.data > long.txt``: print the shipped example document (see memfit.data)."""

import sys

from memfit.data import example_text

sys.stdout.write(example_text())
