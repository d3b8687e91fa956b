"""`python jobs/sweep.py --method dml --students 2 --grid temperature=1,2,4 ...` (also: `cohort sweep`, and under `ray job submit -- python jobs/sweep.py`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from cohort.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
