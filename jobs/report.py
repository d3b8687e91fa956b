"""`python jobs/report.py RUN_DIR` (also: `cohort report RUN_DIR`): RUN_DIR/report.md and RUN_DIR/curves.png."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from cohort.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
