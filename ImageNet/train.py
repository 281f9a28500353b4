"""Train a BNext network: ``python ImageNet/train.py ...`` or ``torchrun --nproc_per_node N ImageNet/train.py ...``.

All flags: ``python ImageNet/train.py --help``. The work is done in :mod:`ImageNet.training`.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ImageNet.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
