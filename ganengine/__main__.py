"""``python -m ganengine ...`` (also ``torchrun -m ganengine train ...``)."""
import sys

from ganengine.cli import main

sys.exit(main())
