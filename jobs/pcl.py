"""`python jobs/pcl.py --arch resnet32 --branches 3 --workers 2 ...` (also: `cohort pcl`, and under `ray job submit -- python jobs/pcl.py`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from cohort.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pcl", *sys.argv[1:]]))
