"""`python jobs/kd.py --teacher resnet32 --student resnet8 ...` (also: `cohort kd`; runs under `ray job submit` too)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from cohort.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["kd", *sys.argv[1:]]))
