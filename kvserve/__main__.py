"""`python -m kvserve ...` (what `torchrun -m kvserve serve ...` runs on every rank)."""
import sys

from kvserve.cli import main

sys.exit(main())
