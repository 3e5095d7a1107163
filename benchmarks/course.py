"""How long the whole course takes: the six notebooks with their defaults, as `make demo` runs them offline.

The README and docs/teaching.md each carry a table of how long every notebook takes. Those tables
used to be typed by hand and went stale; this script is where their numbers come from now.

It runs the README's own offline command (the `make demo DATASET=flickr8k ...` line of its "Running
offline" block, read from the README, so that it measures what a user types) on a Flickr8k folder,
one notebook per `make` call (NOTEBOOKS=01, then 02, ...), in a fresh work folder and runs folder
under a temporary directory: nothing is reused from an earlier run, and nothing lands in data/ or
runs/ of the repository. For each notebook it records

  wall time  time.perf_counter() around the `make` call: what a learner waits
  CPU time   user + system seconds of everything that call started: make, scripts/run_notebooks.py
             and the Jupyter kernel that papermill starts for the notebook. They come from
             resource.getrusage(RUSAGE_CHILDREN), taken before and after the call: it counts a
             process once it has been waited for, and each parent here waits for its children (the
             kernel manager for the kernel, make for run_notebooks.py, this script for make). As a
             check of that, a thread reads every descendant's CPU seconds from /proc once a second
             while the call runs; that sum misses at most the last second of each process, so it
             should be a little below the getrusage figure, never well above it (both are in the JSON).

Then the "tweak loop": notebook 03 once more after a learner changes one hyperparameter through
make's PARAMS (seed=1 by default: the same recipe and budget with another initialisation and
shuffle order, so the loop costs what retraining the default model costs, neither a cheaper nor a
dearer model), timed the same way. It runs after notebook 06, so the notebooks 04-06 of the course
read the default bundle.

Where the time goes inside the notebooks is read from what the run leaves, with no instrumentation
added by this script: the bundles' bundle.json (teacher forcing's seconds, optimizer steps, epochs,
fine-tuning epochs, and the seconds self_critical.py records for each fine-tuning epoch's sampling,
reward, gradient steps and validation scoring, which the report totals per bundle with the median
ratio sampling / gradient steps), the evaluations' metrics.json (seconds to caption and score), and a
few lines the notebooks print (notebook 02's encoding rate, notebook 06's "features + training" seconds).

Results go to benchmarks/results/course-flickr8k.json (written atomically, and after every notebook,
so that a run stopped half-way keeps what it measured), with the machine they were measured on.

    .venv/bin/python benchmarks/course.py [DATA_DIR] [--weights PATH] [--tweak seed=1]
    .venv/bin/python benchmarks/course.py --tables

DATA_DIR defaults to the 875-photo Flickr8k sample beside the repository (../shared/data/flickr8k-sample),
the weights to the MobileNetV2 file beside it. The first form takes about 25 minutes on two cores
(benchmarks/README.md has the last run): run it on an otherwise idle machine. `--tables` runs nothing:
it rewrites the time tables of README.md and docs/teaching.md (between their `<!-- course-times:begin -->`
and `<!-- course-times:end -->` comments) from the JSON; tests/test_course_times.py checks that the
committed tables are what it renders. `--params "epochs=1 experiment_epochs=1"` and `--notebooks 01,02,03`
exist to try the script quickly (with `--out` elsewhere): such a run is marked as not the defaults, and
`--tables` refuses it.

Goals (issue 27, 2-core CPU): the whole course on the 875-photo sample <= 20 min; the tweak loop <= 3 min;
attention fine-tuning: sampling time <= its gradient-step time per epoch. Notebook 06 does not fine-tune by
default: `--params "self_critical_epochs=10"` (with `--out` elsewhere) measures the last goal.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from captioning.fileio import write_json_atomic, write_text_atomic  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k-sample"
DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "course-flickr8k.json"
NOTEBOOKS = ["01_data_preparation", "02_feature_caching", "03_training", "04_decoding", "05_evaluation",
             "06_attention"]
DEFAULT_TWEAK = "seed=1"
GOALS = {"course_minutes": 20, "tweak_loop_minutes": 3}
BEGIN, END = "<!-- course-times:begin -->", "<!-- course-times:end -->"

# The words of the tables. Only the numbers come from the JSON; what each notebook spends its time
# on is what docs/teaching.md has always said, and the README's labels are the README's.
README_LABELS = {
    "01_data_preparation": "`01_data_preparation`",
    "02_feature_caching": "`02_feature_caching`",
    "03_training": "`03_training`",
    "04_decoding": "`04_decoding`",
    "05_evaluation": "`05_evaluation` (trains the inject variants)",
    "06_attention": "`06_attention` (caches grids, trains attention)",
}
WHERE_THE_TIME_GOES = {
    "01_data_preparation": "reading the annotations, the plots",
    "02_feature_caching": "the CNN over every photo",
    "03_training": "teacher forcing (early stopping), then 10 epochs of fine-tuning",
    "04_decoding": "the beam width sweep, the encoder for a new photo, the export",
    "05_evaluation": "training the three inject variants (merge is notebook 03's) and scoring all four",
    "06_attention": "the grid cache, and the attention model's teacher forcing, with early stopping and no fine-tuning",
}


# --- running ------------------------------------------------------------------------------------

def readme_offline_command():
    """The README's offline `make demo` line, continuation lines joined (as tests/conftest.py reads it)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip().startswith("make demo DATASET=flickr8k"):
                return " ".join(line.split())
    raise ValueError("README.md has no ```bash block with a `make demo DATASET=flickr8k ...` line: "
                     "the benchmark runs that command, so it cannot run without it")


def make_command(data_dir, weights, work_dir, runs_dir, notebook, params=""):
    """The README's command with the data and weights filled in (the README writes /data/flickr8k and
    WEIGHTS=/weights/...), one notebook, and this run's own work and runs folders. Every setting the
    environment could also give make is passed on the command line, so that a PARAMS or SOLUTIONS
    left in the shell cannot change what is measured."""
    command = readme_offline_command()
    if "/data/flickr8k" not in command or not re.search(r"WEIGHTS=/weights/\S+", command):
        raise ValueError(f"the README's offline command changed shape ({command!r}): "
                         "update make_command in benchmarks/course.py")
    command = command.replace("/data/flickr8k", shlex.quote(str(data_dir)))
    command = re.sub(r"WEIGHTS=/weights/\S+", f"WEIGHTS={shlex.quote(str(weights))}", command)
    words = shlex.split(command)
    words += [f"WORK_DIR={work_dir}", f"RUNS={runs_dir}", f"NOTEBOOKS={notebook[:2]}", f"PARAMS={params}",
              "SOLUTIONS="]
    return words


def _descendants_cpu(root, seen):
    """Add to `seen` ({(pid, start time): CPU seconds}) every live descendant of `root` (/proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, stats = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                text = file.read().decode(errors="replace")
        except OSError:
            continue  # it ended between the listing and the read
        fields = text[text.rindex(")") + 2:].split()  # after "pid (name) ": state is fields[0]
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        stats[pid] = (int(fields[19]), (int(fields[11]) + int(fields[12])) / ticks)  # starttime, utime+stime
    for pid, (start, cpu) in stats.items():
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor != root and ancestor > 1:
            ancestor = parents.get(ancestor)
        if ancestor == root:
            seen[(pid, start)] = max(cpu, seen.get((pid, start), 0.0))


def timed(command, log_path):
    """Run `command` from the repository root; return its wall and CPU seconds (and the /proc check).
    Its output goes to `log_path`; a failure stops the benchmark with the log's end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seen, done = {}, threading.Event()
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

        def watch():
            while not done.wait(1.0):
                _descendants_cpu(process.pid, seen)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        returncode = process.wait()
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode != 0:
        tail = Path(log_path).read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"`{shlex.join(command)}` exited {returncode}; the end of its output ({log_path}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "cpu_seconds_seen_in_proc": round(sum(seen.values()), 1)}


# --- what the run leaves: where the time went ---------------------------------------------------

def notebook_text(path):
    """Every text output of an executed notebook, as one string."""
    if not Path(path).is_file():
        return ""
    parts = []
    for cell in json.loads(Path(path).read_text(encoding="utf-8"))["cells"]:
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            parts.append("".join(text) if isinstance(text, list) else str(text))
    return "\n".join(parts)


# What the notebooks print about their own time: (notebook, name in the JSON, pattern; group 1 the number).
PRINTED = [
    ("02_feature_caching", "encoding_images_per_second", r"encoding: [\d,]+ images in [\d.]+ s = ([\d.]+) images/s"),
    ("02_feature_caching", "encoding_seconds", r"encoding: [\d,]+ images in ([\d.]+) s"),
    ("03_training", "teacher_forcing_seconds_printed", r"trained \d+ epochs in (\d+) s"),
    ("06_attention", "grid_features_and_training_seconds", r"features \+ training: (\d+) s"),
]


FINE_TUNING_PARTS = ("sampling", "reward", "gradient", "validation")


def fine_tuning_split(epochs):
    """The self-critical epochs' own clock (their "seconds": sampling, reward, gradient steps, validation
    scoring): each part's total over the epochs, and the median over epochs of sampling / gradient, the
    ratio of issue 27's goal for attention (<= 1). {} when the epochs carry no seconds (no fine-tuning,
    or a bundle from before self_critical.py recorded them)."""
    timed = [row["seconds"] for row in epochs if isinstance(row.get("seconds"), dict)]
    if not timed:
        return {}
    ratios = [seconds["sampling"] / seconds["gradient"] for seconds in timed
              if seconds.get("gradient") and "sampling" in seconds]
    return {"fine_tuning_seconds": {part: round(sum(seconds.get(part, 0.0) for seconds in timed), 2)
                                    for part in FINE_TUNING_PARTS},
            "sampling_over_gradient_median": round(statistics.median(ratios), 3) if ratios else None}


def fine_tuning_lines(bundles):
    """The report's lines on fine-tuning: per bundle that fine-tuned, where its epochs' time went."""
    lines = []
    for name, record in bundles.items():
        if "fine_tuning_seconds" in record:
            parts = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in record["fine_tuning_seconds"].items())
            ratio = record["sampling_over_gradient_median"]
            lines.append(f"{name}: fine-tuning, {record['fine_tuning_epochs']} epochs: {parts}; sampling / gradient "
                         f"per epoch (median) {'n/a' if ratio is None else f'{ratio:.2f}'}")
    return lines


def where_the_time_went(work_dir, runs_dir):
    """What the run's files say about its time (see the docstring); {} entries where a file is missing."""
    found = {"printed": {}, "bundles": {}, "evaluations": {}, "taken": []}
    for notebook, name, pattern in PRINTED:
        match = re.search(pattern, notebook_text(Path(runs_dir) / f"{notebook}.ipynb"))
        if match:
            found["printed"][name] = float(match.group(1))
    # The architectures notebook 05 did not train: it took notebook 03's teacher-forced model (captioning/runs.py)
    found["taken"] = re.findall(r"^(\S+): teacher forcing: taking the model kept in ", notebook_text(
        Path(runs_dir) / "05_evaluation.ipynb"), flags=re.M)
    for path in sorted(Path(work_dir).rglob("bundle.json")):
        metrics = json.loads(path.read_text(encoding="utf-8")).get("metrics", {})
        # self_critical's rows are its epochs, then a summary row ("mean of 6-10"), not an epoch
        epochs = [row for row in metrics.get("self_critical", []) if isinstance(row.get("epoch"), int)]
        found["bundles"][str(path.parent.relative_to(work_dir))] = {
            "teacher_forcing_seconds": metrics.get("training_seconds"),
            "teacher_forcing_steps": metrics.get("steps"),
            "teacher_forcing_epochs": metrics.get("epochs_run"),
            "fine_tuning_epochs": len(epochs),
            **fine_tuning_split(epochs),
        }
    for path in sorted(Path(work_dir).rglob("metrics.json")):
        metrics = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(metrics, dict) and "seconds" in metrics:
            found["evaluations"][str(path.parent.relative_to(work_dir))] = {
                "seconds": metrics["seconds"], "images": metrics.get("images")}
    return found


# --- the data and the machine -------------------------------------------------------------------

def photo_counts(data_dir):
    """Photos on disk per official split of a Flickr8k folder (text/ or the folder itself; images/ or
    Flicker8k_Dataset/). A missing folder or layout is a ValueError naming what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"no data folder at {data_dir}: pass a Flickr8k folder (Flickr8k.token.txt, "
                         "Flickr_8k.{train,dev,test}Images.txt, the photos in images/ or Flicker8k_Dataset/)")
    text = data_dir / "text" if (data_dir / "text").is_dir() else data_dir
    images = next((data_dir / name for name in ("images", "Flicker8k_Dataset") if (data_dir / name).is_dir()), None)
    if images is None or not (text / "Flickr8k.token.txt").is_file():
        raise ValueError(f"{data_dir} is not a Flickr8k folder: it needs Flickr8k.token.txt (in it or in text/) "
                         "and the photos in images/ or Flicker8k_Dataset/")
    on_disk = {path.name for path in images.iterdir()}
    counts = {}
    for split in ("train", "dev", "test"):
        listing = text / f"Flickr_8k.{split}Images.txt"
        names = listing.read_text(encoding="utf-8").split() if listing.is_file() else []
        counts[split] = len(set(names) & on_disk)
    counts["total"] = sum(counts.values())  # the photos the course uses: a photo in no split is left out
    counts["on_disk"] = len(on_disk)
    return counts


def machine():
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.M)
    meminfo = Path("/proc/meminfo").read_text(encoding="utf-8")
    kilobytes = int(re.search(r"^MemTotal:\s*(\d+)", meminfo, flags=re.M).group(1))

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(kilobytes / 1024 ** 2, 1),
        "gpu": "none" if not Path("/proc/driver/nvidia").exists() else "NVIDIA driver present",
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "tensorflow": version("tensorflow") or version("tensorflow-cpu"),
        "keras": version("keras"),
        "git_commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def measure(data_dir, weights, out, tweak, params, only):
    weights = Path(weights)
    if not weights.is_file():
        raise ValueError(f"no weights file at {weights}: pass --weights, a no-top MobileNetV2 .weights.h5")
    counts = photo_counts(data_dir)
    # make demo first reinstalls the environment when requirements.txt is newer than its stamp: that
    # is an install, not the course, and it would land in notebook 01's time.
    if subprocess.run(["make", "-q", "setup"], cwd=REPO, capture_output=True).returncode != 0:
        raise SystemExit("the environment is out of date (make -q setup): run `make setup` first, "
                         "so that the benchmark times the notebooks, not an install")
    root = Path(tempfile.mkdtemp(prefix="course-benchmark-"))
    work_dir, runs_dir, logs = root / "work", root / "runs", root / "logs"
    logs.mkdir()
    results = {
        "what": "make demo offline (README) with the notebooks' defaults, one notebook per make call",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data_dir": str(data_dir), "photos": counts, "encoder": "mobilenet_v2", "weights": weights.name,
        "params": params, "defaults": not params and only is None,
        "command": shlex.join(make_command(data_dir, weights, work_dir, runs_dir, "01_data_preparation", params)),
        "machine": machine(), "goals": GOALS, "notebooks": {}, "complete": False,
    }
    print(f"{counts['total']} photos ({counts['train']} train, {counts['dev']} dev, {counts['test']} test) "
          f"in {data_dir}; work folder {root}; load average {results['machine']['load_average_at_start']}")
    chosen = [name for name in NOTEBOOKS if only is None or name[:2] in only]
    for notebook in chosen:
        command = make_command(data_dir, weights, work_dir, runs_dir, notebook, params)
        results["notebooks"][notebook] = timed(command, logs / f"{notebook}.log")
        times = results["notebooks"][notebook]
        print(f"{notebook}: {times['wall_seconds']:.0f} s wall, {times['cpu_seconds']:.0f} s CPU "
              f"({times['cpu_seconds_seen_in_proc']:.0f} s seen in /proc)", flush=True)
        write_json_atomic(out, results)  # a run stopped later keeps what it measured
    results["total"] = {key: round(sum(times[key] for times in results["notebooks"].values()), 1)
                        for key in ("wall_seconds", "cpu_seconds")}
    results["where_the_time_went"] = where_the_time_went(work_dir, runs_dir)
    write_json_atomic(out, results)
    for line in fine_tuning_lines(results["where_the_time_went"]["bundles"]):
        print(line, flush=True)
    if "03_training" in chosen and tweak:
        tweak_params = " ".join(part for part in (params, tweak) if part)
        command = make_command(data_dir, weights, work_dir, runs_dir, "03_training", tweak_params)
        results["tweak_loop"] = {"notebook": "03_training", "params": tweak, "command": shlex.join(command),
                                 **timed(command, logs / "tweak-03_training.log")}
        bundle = where_the_time_went(work_dir, runs_dir)["bundles"].get("bundles/flickr8k-mobilenet_v2-merge")
        results["tweak_loop"]["bundle"] = bundle
        print(f"tweak loop (03 with {tweak}): {results['tweak_loop']['wall_seconds']:.0f} s wall, "
              f"{results['tweak_loop']['cpu_seconds']:.0f} s CPU", flush=True)
    results["complete"] = True
    write_json_atomic(out, results)
    print(f"total: {results['total']['wall_seconds'] / 60:.1f} min wall, "
          f"{results['total']['cpu_seconds'] / 60:.1f} min CPU -> {out} (logs and runs in {root})")
    return results


# --- the tables ---------------------------------------------------------------------------------

def duration(seconds):
    """A time as the tables write it: seconds under a minute and a half, minutes above."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _photos(results):
    """The photos the course ran on, in words: "866 photos of the Flickr8k sample (753 training, 113 dev, ...)"."""
    photos = results["photos"]
    splits = ", ".join(f"{photos[split]} {word}" for split, word in
                       (("train", "training"), ("dev", "dev"), ("test", "test")) if photos.get(split))
    listed = (f", those its official splits list of the {photos['on_disk']} in its folder"
              if photos.get("on_disk") not in (None, photos["total"]) else "")
    return f"{photos['total']} photos of the Flickr8k sample ({splits}, five captions each{listed})"


def _measured_line(results):
    machine_ = results["machine"]
    return (f"Measured by `benchmarks/course.py` on {results['date'][:10]}: the README's offline `make demo` with "
            f"the notebooks' defaults, one notebook per `make` call in a fresh work folder, on {_photos(results)}, "
            f"MobileNetV2 with a local weights file; {machine_['cores']} CPU cores ({machine_['cpu_model']}), "
            f"{machine_['ram_gb']:.0f} GB RAM, no GPU, load average {machine_['load_average_at_start'][0]:.1f} at "
            f"the start. CPU time counts every process of the run (the notebook's kernel with all its threads): "
            f"where it exceeds the wall time, the notebook kept more than one core busy.")


def _tweak_line(results):
    tweak = results.get("tweak_loop")
    if not tweak:
        return "The tweak loop (notebook 03 again after one changed parameter) was not measured."
    return (f"The tweak loop, notebook 03 run again after a learner changes one parameter "
            f"(`make demo ... NOTEBOOKS=03 PARAMS=\"{tweak['params']}\"`"
            f"{': same recipe, another seed' if tweak['params'].startswith('seed=') else ''}): "
            f"**{duration(tweak['wall_seconds'])}** ({duration(tweak['cpu_seconds'])} CPU).")


def _total_row(results, cells):
    missing = [name for name in NOTEBOOKS if name not in results["notebooks"]]
    total = results.get("total") or {key: sum(times[key] for times in results["notebooks"].values())
                                      for key in ("wall_seconds", "cpu_seconds")}
    note = f" (without {', '.join(name[:2] for name in missing)}: not measured)" if missing else ""
    return cells(f"**{duration(total['wall_seconds'])}**{note}", duration(total["cpu_seconds"]))


def _in_this_run(results, notebook):
    """What the run's own files say about `notebook`'s time, in words ("" when they say nothing)."""
    went = results.get("where_the_time_went") or {}
    printed, bundles, evaluations = (went.get(key, {}) for key in ("printed", "bundles", "evaluations"))

    def bundle(folder, arch):
        return next((value for key, value in bundles.items()
                     if key.startswith(folder + "/") and key.endswith("-" + arch)), None)

    def teacher_forcing(record):
        return (f"teacher forcing {duration(record['teacher_forcing_seconds'])} over "
                f"{record['teacher_forcing_epochs']} epochs, {record['teacher_forcing_steps']:,} steps")

    def fine_tuning(record):
        """[] for a bundle whose epochs were not timed (a JSON from before they were)."""
        seconds = record.get("fine_tuning_seconds")
        if not seconds:
            return []
        named = {"gradient": "gradient steps"}
        return [f"fine-tuning {duration(sum(seconds.values()))}: " + ", ".join(
            f"{named.get(part, part)} {duration(seconds[part])}" for part in FINE_TUNING_PARTS)]

    parts = []
    if notebook == "02_feature_caching" and "encoding_seconds" in printed:
        parts.append(f"encoding {duration(printed['encoding_seconds'])} at "
                     f"{printed['encoding_images_per_second']:.1f} photos/s")
    if notebook == "03_training" and bundle("bundles", "merge"):
        parts.append(teacher_forcing(bundle("bundles", "merge")))
        parts += fine_tuning(bundle("bundles", "merge"))
    if notebook == "05_evaluation":
        taken = went.get("taken", [])
        trained = [value for key, value in bundles.items()
                   if key.startswith("experiment/") and not any(key.endswith(f"-{arch}") for arch in taken)]
        if trained:
            parts.append(f"teacher forcing of the {len(trained)} models "
                         f"{duration(sum(value['teacher_forcing_seconds'] for value in trained))}"
                         + (f", {' and '.join(taken)} taken from notebook 03" if taken else ""))
        scored = [value["seconds"] for key, value in evaluations.items()
                  if key.startswith("experiment/") or (key.startswith("evaluations/") and "-merge-" in key)]
        if scored:
            parts.append(f"{len(scored)} evaluations, captioning and scoring, {duration(sum(scored))} in all")
    if notebook == "06_attention":
        if "grid_features_and_training_seconds" in printed:
            parts.append(f"grid cache and training {duration(printed['grid_features_and_training_seconds'])}")
        if bundle("bundles", "attention"):
            parts.append("of it " + teacher_forcing(bundle("bundles", "attention")))
            parts += fine_tuning(bundle("bundles", "attention"))
    return f" (this run: {'; '.join(parts)})" if parts else ""


def render_tables(results):
    """{document: the text between its markers}, for README.md and docs/teaching.md."""
    if not results.get("defaults", False):
        raise ValueError("these results are not a run with the notebooks' defaults (--params or --notebooks "
                         "was given): the tables show only the defaults")

    def time_cells(notebook):
        times = results["notebooks"].get(notebook)
        if times is None:
            return "not measured", "not measured"
        return duration(times["wall_seconds"]), duration(times["cpu_seconds"])

    readme = ["| notebook | wall time | CPU time |", "| --- | --- | --- |"]
    teaching = ["| notebook | wall time | CPU time | where the time goes |", "| --- | --- | --- | --- |"]
    for notebook in NOTEBOOKS:
        wall, cpu = time_cells(notebook)
        readme.append(f"| {README_LABELS[notebook]} | {wall} | {cpu} |")
        teaching.append(f"| `{notebook}` | {wall} | {cpu} | {WHERE_THE_TIME_GOES[notebook]}"
                        f"{_in_this_run(results, notebook)} |")
    readme.append(_total_row(results, lambda wall, cpu: f"| total | {wall} | {cpu} |"))
    teaching.append(_total_row(results, lambda wall, cpu: f"| total | {wall} | {cpu} | |"))
    measured, tweak = _measured_line(results), _tweak_line(results)
    return {
        "README.md": "\n".join([measured, "", *readme, "", tweak]),
        "docs/teaching.md": "\n".join([measured, "", *teaching, "", tweak]),
    }


def replace_between_markers(text, block, name):
    """`text` with what lies between its BEGIN and END comments replaced by `block`."""
    pattern = re.compile(re.escape(BEGIN) + r"\n(?:.*?\n)?" + re.escape(END), flags=re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"{name} needs exactly one {BEGIN} ... {END} pair around its time table")
    return pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text)


def between_markers(text, name):
    """What lies between `text`'s markers (tests/test_course_times.py compares it with render_tables)."""
    match = re.search(re.escape(BEGIN) + r"\n(?:(.*?)\n)?" + re.escape(END), text, flags=re.S)
    if match is None:
        raise ValueError(f"{name} has no {BEGIN} ... {END} pair around its time table")
    return match.group(1) or ""


def write_tables(results_path):
    results = json.loads(Path(results_path).read_text(encoding="utf-8"))
    for name, block in render_tables(results).items():
        path = REPO / name
        text = path.read_text(encoding="utf-8")
        updated = replace_between_markers(text, block, name)
        if updated != text:
            write_text_atomic(path, updated)
        print(f"{name}: {'rewritten' if updated != text else 'already up to date'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=str(DEFAULT_DATA), help="a Flickr8k folder")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="MobileNetV2 no-top .weights.h5")
    parser.add_argument("--tweak", default=DEFAULT_TWEAK,
                        help="the changed parameter of the tweak loop, as PARAMS takes it; empty: no tweak loop")
    parser.add_argument("--out", default=str(DEFAULT_RESULTS), help="where the JSON goes")
    parser.add_argument("--params", default="", help="for trying the script quickly: PARAMS for every notebook")
    parser.add_argument("--notebooks", default=None, help="for trying the script quickly: e.g. 01,02,03")
    parser.add_argument("--tables", action="store_true",
                        help="run nothing: rewrite the tables of README.md and docs/teaching.md from --out")
    args = parser.parse_args(argv)
    try:
        if args.tables:
            write_tables(args.out)
            return 0
        data_dir = Path(args.data_dir).resolve()
        only = args.notebooks.split(",") if args.notebooks else None
        results = measure(data_dir, Path(args.weights).resolve(), Path(args.out), args.tweak, args.params, only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    wall = results["total"]["wall_seconds"]
    print(f"course_minutes: {wall / 60:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
