"""Execute the course notebooks in order with papermill; executed copies go to --out.

This is what `make demo` runs, and what the test suite runs on the small
shared data. Each notebook receives only the parameters its `parameters` cell
declares, so the same command line serves all of them.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import papermill

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def notebook_paths(only=None):
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [path for path in paths if path.name[:2] in only]
    return paths


def run(parameters, out_dir, only=None, log=print):
    """Run the notebooks (all, or those whose two-digit prefix is in `only`)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Keep TensorFlow's C++ start-up lines out of the executed notebooks.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in os.environ["PYTHONPATH"].split(os.pathsep):
        os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ["PYTHONPATH"]
    executed = []
    for path in notebook_paths(only):
        declared = papermill.inspect_notebook(str(path))
        chosen = {key: value for key, value in parameters.items() if key in declared}
        output = out_dir / path.name
        log(f"running {path.name} with {chosen}")
        start = time.perf_counter()
        papermill.execute_notebook(
            str(path), str(output), parameters=chosen, cwd=str(NOTEBOOKS),
            kernel_name="python3", progress_bar=False, log_output=False,
        )
        log(f"  done in {time.perf_counter() - start:.0f} s -> {output}")
        executed.append(output)
    return executed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs")
    parser.add_argument("--only", default=None, help="comma-separated prefixes, e.g. 01,02")
    parser.add_argument("--dataset", default="coco")
    parser.add_argument("--data-dir", default="data/coco")
    parser.add_argument("--work-dir", default="data/work")
    parser.add_argument("--encoder", default="inception_v3")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--download", type=int, default=1, help="1: download what is missing; 0: offline")
    parser.add_argument("--subset-size", type=int, default=2000)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="any other notebook parameter (the value is read as a Python literal when it can be)")
    args = parser.parse_args(argv)

    def absolute(path):
        return path if path == "imagenet" else str(Path(path).resolve())

    parameters = {
        "dataset": args.dataset,
        "data_dir": absolute(args.data_dir),
        "work_dir": absolute(args.work_dir),
        "encoder": args.encoder,
        "weights": absolute(args.weights),
        "download": bool(args.download),
        "subset_size": args.subset_size,
    }
    import ast
    for name, value in args.parameter:
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    only = args.only.split(",") if args.only else None
    try:
        run(parameters, args.out, only)
    except papermill.PapermillExecutionError as error:
        print(f"notebook failed: {error.ename}: {error.evalue}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
