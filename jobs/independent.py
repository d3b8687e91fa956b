"""`python jobs/independent.py --students 4 --arch resnet32 ...` (also: `cohort independent`, and under `ray job submit -- python jobs/independent.py`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from cohort.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["independent", *sys.argv[1:]]))
