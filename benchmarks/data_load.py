"""Data at Fashion-MNIST's size: seconds to load the 70,000 images (60,000 train + 10,000 test)
with `cohort.data.load_dataset`, from

* `idx`: the four gzipped idx files of the Debian package dataset-fashion-mnist
  (/usr/share/datasets/fashion-mnist), and
* `parquet`: the same images as Hugging Face datasets writes them, PNG bytes in an
  `image: struct<bytes: binary, path: string>` column beside `label`, in
  `data/train-00000-of-00001.parquet` and `data/test-00000-of-00001.parquet` (written here
  from the idx files on the first run, then reused; the loader decodes every PNG).

Each load runs in a fresh Python process (as a job starts), interleaved by round (listed order
in even rounds, reversed in odd ones). Per load: the seconds inside `load_dataset` and the
process's whole wall time (interpreter start and imports included). The Parquet images and
labels are checked equal to the idx ones. Target: the whole process <= 10 s (issue 14).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import compare, describe, finish, machine, parser, table

TARGET_SECONDS = 10.0
DEBIAN = Path("/usr/share/datasets/fashion-mnist")

# What the fresh process runs: import, load, report the load's seconds and a digest.
LOAD = """
import json, sys, time, hashlib
began = time.perf_counter()
from cohort.data import load_dataset
imported = time.perf_counter()
ds = load_dataset(sys.argv[1], sys.argv[2] or None, download=False)
loaded = time.perf_counter()
digest = hashlib.sha256()
for t in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
    digest.update(t.contiguous().numpy().tobytes())
print(json.dumps({"load_seconds": loaded - imported, "import_seconds": imported - began,
                  "train": len(ds.train_labels), "test": len(ds.test_labels),
                  "sha256": digest.hexdigest()}))
"""


def write_parquet(source: Path, folder: Path) -> None:
    """The idx files as Hugging Face's Parquet layout: PNG bytes in a struct column."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from cohort.data import load_dataset

    ds = load_dataset("fashion-mnist", str(source), download=False)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, images, labels in (("train", ds.train_images, ds.train_labels),
                                  ("test", ds.test_images, ds.test_labels)):
        encoded = []
        for image in images[:, 0].numpy():
            buffer = io.BytesIO()
            Image.fromarray(image, mode="L").save(buffer, format="PNG")
            encoded.append({"bytes": buffer.getvalue(), "path": None})
        columns = {"image": pa.array(encoded, type=kind), "label": pa.array(labels.numpy())}
        target = folder / "data" / f"{split}-00000-of-00001.parquet"
        pq.write_table(pa.table(columns), target.with_suffix(".tmp"))
        target.with_suffix(".tmp").rename(target)


def load_once(name: str, where: Path) -> dict:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LOAD, name, str(where)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - began
    return result


def main() -> None:
    ap = parser("data_load", __doc__)
    ap.add_argument("--idx-dir", default=str(DEBIAN), help="folder of the four idx files")
    ap.add_argument("--parquet-dir", default="/tmp/cohort-fashion-mnist-parquet",
                    help="where the Parquet copy is written (reused when present)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    started = time.perf_counter()
    idx, parquet = Path(args.idx_dir), Path(args.parquet_dir)
    if not idx.is_dir():
        sys.exit(f"error: --idx-dir: {idx} does not exist (apt-get install dataset-fashion-mnist)")
    if not (parquet / "data" / "test-00000-of-00001.parquet").is_file():
        print(f"writing the Parquet copy to {parquet} ...", flush=True)
        write_parquet(idx, parquet)
    sources = {"idx": ("fashion-mnist", idx), "parquet": ("parquet", parquet / "data")}
    runs = {label: [] for label in sources}
    rounds = 1 if args.quick else args.rounds
    for r in range(rounds):
        order = list(sources) if r % 2 == 0 else list(reversed(sources))
        for label in order:
            runs[label].append(load_once(*sources[label]))
            print(f"round {r}: {label} {runs[label][-1]['process_seconds']:.2f} s", flush=True)
    digests = {label: {run["sha256"] for run in results} for label, results in runs.items()}
    same = digests["idx"] == digests["parquet"] and len(digests["idx"]) == 1
    comparisons = [compare(f"{label}: process wall time, s", [run["process_seconds"] for run in results],
                           TARGET_SECONDS, "<=", unit=" s") for label, results in runs.items()]
    comparisons += [compare(f"{label}: load_dataset alone, s", [run["load_seconds"] for run in results],
                            TARGET_SECONDS, "<=", unit=" s") for label, results in runs.items()]
    for c in comparisons:
        print(describe(c))
    print(f"Parquet images and labels equal the idx files': {same}")
    medians = {c["label"]: c["median"] for c in comparisons}
    rows = [{"source": label, "images": results[0]["train"] + results[0]["test"],
             "load_dataset s": f"{medians[f'{label}: load_dataset alone, s']:.2f}",
             "process s": f"{medians[f'{label}: process wall time, s']:.2f}"}
            for label, results in runs.items()]
    print(table(rows, list(rows[0])))
    parquet_bytes = sum(p.stat().st_size for p in (parquet / "data").glob("*.parquet"))
    finish(args, "data_load", {"machine": machine(), "rounds": rounds, "same_images": same,
                               "parquet_bytes": parquet_bytes, "comparisons": comparisons,
                               "runs": runs}, started)


if __name__ == "__main__":
    main()
