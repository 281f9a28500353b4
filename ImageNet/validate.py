"""Evaluate a checkpoint: ``python ImageNet/validate.py --checkpoint FILE --data-dir DIR [--model NAME]``.

All flags: ``python ImageNet/validate.py --help``. The work is done in :mod:`ImageNet.validation`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ImageNet.validation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
