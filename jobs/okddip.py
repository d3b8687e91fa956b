"""`python jobs/okddip.py --arch resnet32 --branches 4 --workers 2 ...` (also: `cohort okddip`, and under `ray job submit -- python jobs/okddip.py`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from cohort.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["okddip", *sys.argv[1:]]))
