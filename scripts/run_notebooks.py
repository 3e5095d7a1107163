"""Execute the course notebooks in order with papermill; executed copies go to --out.

This is what `make demo` runs, and what the test suite runs on the small
shared data. Each notebook receives only the parameters its `parameters` cell
declares, so the same command line serves all of them. `--solutions` also runs
the exercises' solutions (notebooks/solutions/, copies in OUT/solutions/) after
the course notebooks, and `--solutions-only` runs only them (`make solutions`),
on the work folder the course notebooks left.

Before starting any notebook it checks, in a few seconds, that what the run
will download can be downloaded (the COCO server, Keras's ImageNet weights).
Offline, it stops there with one message naming the settings that use local
files instead, rather than failing inside notebook 01 or 02 minutes later. Then it
says how long the run will take (scripts/estimate.py).
"""

import argparse
import atexit
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
sys.path.insert(0, str(REPO))  # the captioning package, when run from a fresh clone without installing it


def notebook_paths(only=None, folder=NOTEBOOKS):
    """The course notebooks (or, with folder=SOLUTIONS, their solutions), in order."""
    paths = sorted(Path(folder).glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [path for path in paths if path.name[:2] in only]
    return paths


def _kernel_manager():
    """Jupyter's kernel manager, with two changes. Its client waits for messages in slices
    (`_steady_client`). And it talks to the kernel over Unix sockets (IPC) in a private
    temporary folder: no port open to the network, so the kernel does not warn, in every run's
    output, that its TCP traffic is unencrypted. Jupyter's default (TCP) where there are no Unix
    sockets (Windows) or where the socket paths would pass their limit of 104 bytes."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum, default

    class SteadyKernelManager(AsyncKernelManager):
        @default("client_factory")
        def _steady_client_factory(self):
            return _steady_client()

    longest = os.path.join(tempfile.gettempdir(), "kernel-xxxxxxxx", "ipc-65535")
    if os.name != "posix" or len(os.fsencode(longest)) >= 104:
        return SteadyKernelManager

    class LocalKernelManager(SteadyKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc")

        @default("ip")
        def _socket_prefix(self):  # Jupyter's default is relative: sockets in the notebook's folder
            folder = tempfile.mkdtemp(prefix="kernel-")  # 0700: this user's only
            atexit.register(shutil.rmtree, folder, True)
            return os.path.join(folder, "ipc")

    return LocalKernelManager


@functools.cache
def _steady_client():
    """Jupyter's asynchronous kernel client, whose channels never wait for a message unbounded.

    pyzmq's asyncio sockets learn of new messages from an edge-triggered file descriptor. Now
    and then, under load, papermill's event loop misses the edge: the kernel has answered, the
    answer sits in the client's socket, and both processes sleep for good. We saw it about once in
    fifty runs of a small widget notebook (notebook 04's panel hung `make demo` in CI twice), with
    TCP and with IPC alike. A poll with a timeout ends with a level-triggered check of the socket,
    so waiting in one-second slices turns a lost wake-up into a second's delay."""
    from jupyter_client.asynchronous import AsyncKernelClient
    from jupyter_client.channels import AsyncZMQSocketChannel
    from traitlets import Type

    class SteadyChannel(AsyncZMQSocketChannel):
        async def get_msg(self, timeout=None):
            if timeout is not None:
                return await super().get_msg(timeout)
            while not await self.socket.poll(1000):
                pass
            return await self._recv()

    class SteadyClient(AsyncKernelClient):
        shell_channel_class = Type(SteadyChannel)
        iopub_channel_class = Type(SteadyChannel)
        stdin_channel_class = Type(SteadyChannel)
        control_channel_class = Type(SteadyChannel)

    return SteadyClient


def _execute(paths, parameters, out_dir, cwd, label, log):
    """Run `paths` one after the other in `cwd`; log each wall time and the total."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    executed, times = [], []
    for path in paths:
        declared = papermill.inspect_notebook(str(path))
        chosen = {key: value for key, value in parameters.items() if key in declared}
        output = out_dir / path.name
        log(f"running {path.name} with {chosen}")
        start = time.perf_counter()
        papermill.execute_notebook(
            str(path), str(output), parameters=chosen, cwd=str(cwd),
            kernel_name="python3", progress_bar=False, log_output=False, kernel_manager_class=_kernel_manager(),
        )
        times.append((path.name, time.perf_counter() - start))
        log(f"  {path.name}: {times[-1][1]:.0f} s -> {output}")
        executed.append(output)
    if len(times) > 1:
        log(f"{label}: " + ", ".join(f"{name[:2]} {seconds:.0f} s" for name, seconds in times)
            + f"; total {sum(seconds for _, seconds in times):.0f} s")
    return executed


def run(parameters, out_dir, only=None, log=print, solutions=False, course=True):
    """Run the notebooks (all, or those whose two-digit prefix is in `only`); return the
    executed copies. With solutions=True the matching solution notebooks run afterwards
    (executed copies in OUT/solutions/); course=False runs only those. `log` receives
    each notebook's wall time and the totals."""
    out_dir = Path(out_dir).resolve()
    # Keep TensorFlow's C++ start-up lines out of the executed notebooks.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in os.environ["PYTHONPATH"].split(os.pathsep):
        os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ["PYTHONPATH"]
    executed = []
    if course:
        executed += _execute(notebook_paths(only), parameters, out_dir, NOTEBOOKS, "wall time", log)
    if solutions:
        executed += _execute(notebook_paths(only, SOLUTIONS), parameters, out_dir / "solutions", SOLUTIONS,
                             "solutions wall time", log)
    return executed


def check_settings(parameters, only=None):
    """None if the run's settings name notebooks and parameters that exist, with values of the right
    kind; otherwise the message to print. Checked before any notebook runs: a typo in NOTEBOOKS or
    PARAMS must not cost the notebooks before the one it breaks (or run nothing and exit 0)."""
    import ast
    import difflib

    import papermill

    from captioning.architectures import ARCHITECTURES
    from captioning.data import DATASETS
    from captioning.encoders import ENCODERS
    from captioning.training import PRESETS

    prefixes = [path.name[:2] for path in notebook_paths()]
    unknown = [name for name in (only or []) if name not in prefixes]
    if unknown or (only is not None and not only):
        return (f"NOTEBOOKS={','.join(only)}: no notebook {', '.join(unknown) or '(empty)'}; name them by their two "
                f"digits, comma-separated, from {','.join(prefixes)} (e.g. NOTEBOOKS=01,02)")
    declared = {}  # every notebook's parameters, not only those that run: a name none has is a typo
    for path in notebook_paths() + notebook_paths(folder=SOLUTIONS):
        for name, spec in papermill.inspect_notebook(str(path)).items():
            declared.setdefault(name, spec["default"])
    for name, value in parameters.items():
        if name not in declared:
            if name in ("dataset", "data_dir", "work_dir", "encoder", "weights", "download", "subset_size"):
                continue  # make demo's own settings: passed to whichever notebooks declare them
            close = difflib.get_close_matches(name, declared, n=1)
            return (f"PARAMS: no notebook has a parameter {name!r}"
                    + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; the notebooks' parameters: {', '.join(sorted(declared))}")
        try:
            default = ast.literal_eval(declared[name])
        except (ValueError, SyntaxError):
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = ("a whole number" if isinstance(default, int) and not isinstance(default, bool) and
                    not (isinstance(value, int) and not isinstance(value, bool)) else
                    "a number" if isinstance(default, float) and not numeric else
                    "True or False" if isinstance(default, bool) and not isinstance(value, bool) else
                    "text" if isinstance(default, str) and not isinstance(value, str) else
                    "a number or None" if default is None and not (numeric or value is None) else None)
        if expected:
            return f"PARAMS: {name}={value!r} should be {expected} (the notebooks' default is {declared[name]})"
    choices = {"dataset": DATASETS, "encoder": ENCODERS, "preset": PRESETS, "arch": ARCHITECTURES}
    for name, table in choices.items():
        if name in parameters and parameters[name] not in table:
            return f"{name} {parameters[name]!r} is not one of {', '.join(table)}"
    return None


def _keras_weights_missing(encoder):
    """True when Keras would have to download `encoder`'s ImageNet weights (not in its cache)."""
    from captioning.encoders import ENCODERS
    spec = ENCODERS.get(encoder)
    if spec is None:
        return False  # the notebook names the unknown encoder itself
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    return not (cache / spec.imagenet_file).is_file()


def preflight(parameters, needed=None):
    """None if every download the run needs can start; otherwise the message to print.

    `needed` lists the notebook prefixes that will run (None: all six).
    """
    from captioning import download

    blocked = []
    if parameters["download"] and parameters["dataset"] == "coco" and (needed is None or "01" in needed):
        if download.subset_missing(parameters["data_dir"], parameters["subset_size"]):
            try:
                download.check_online(download.coco_base_url())
            except (ConnectionError, ValueError) as error:
                blocked.append(("the COCO annotations and images", error))
    if parameters["weights"] == "imagenet" and _keras_weights_missing(parameters["encoder"]):
        try:
            download.check_online("https://storage.googleapis.com")
        except ConnectionError as error:
            blocked.append((f"{parameters['encoder']}'s ImageNet weights", error))
    if not blocked:
        return None
    reasons = "; ".join(f"{what}: {str(error).splitlines()[0].rstrip('.')}" for what, error in blocked)
    return (f"make demo cannot download what it needs ({reasons}). Offline, run it on files you already have: "
            "DATA_DIR=your COCO or Flickr8k folder, DOWNLOAD=0 to use only what is on disk, and WEIGHTS=a local "
            "no-top .weights.h5 file for ENCODER, e.g. `make demo DATASET=flickr8k DATA_DIR=/data/flickr8k "
            "DOWNLOAD=0 ENCODER=mobilenet_v2 WEIGHTS=/weights/mobilenet_v2_no_top.weights.h5` (README: Running offline)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs")
    parser.add_argument("--only", default=None, help="comma-separated prefixes, e.g. 01,02")
    parser.add_argument("--dataset", default="coco")
    parser.add_argument("--data-dir", default="data/coco")
    parser.add_argument("--work-dir", default="data/work")
    parser.add_argument("--encoder", default="inception_v3")
    parser.add_argument("--weights", default="imagenet", help="'imagenet', 'none' (random) or a .weights.h5 path")
    parser.add_argument("--download", type=int, default=1, help="1: download what is missing; 0: offline")
    parser.add_argument("--subset-size", type=int, default=None,
                        help="COCO images to download (default: captioning.download.SUBSET_SIZE)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="any other notebook parameter (the value is read as a Python literal when it can be)")
    parser.add_argument("--solutions", action="store_true",
                        help="also run the exercises' solutions (notebooks/solutions/) after the course notebooks")
    parser.add_argument("--solutions-only", action="store_true",
                        help="run only the solutions, on the work folder the course notebooks left")
    args = parser.parse_args(argv)

    def absolute(path):
        return path if path in ("imagenet", "none") else str(Path(path).resolve())

    from captioning.download import SUBSET_SIZE
    parameters = {
        "dataset": args.dataset,
        "data_dir": absolute(args.data_dir),
        "work_dir": absolute(args.work_dir),
        "encoder": args.encoder,
        "weights": absolute(args.weights),
        "download": bool(args.download),
        "subset_size": SUBSET_SIZE if args.subset_size is None else args.subset_size,
    }
    import ast
    for name, value in args.parameter:
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    only = args.only.split(",") if args.only is not None else None
    course = not args.solutions_only
    problem = check_settings(parameters, only) or \
        preflight(parameters, only if course else [])  # the solutions download nothing but weights
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if course:  # how long, before it starts: from the benchmarks' measured rates (scripts/estimate.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from estimate import estimate_line
        line = estimate_line(parameters, only)
        if line:
            print(line, flush=True)
    import papermill
    try:
        run(parameters, args.out, only, solutions=args.solutions or args.solutions_only, course=course)
    except papermill.PapermillExecutionError as error:
        print(f"notebook failed: {error.ename}: {error.evalue}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
