"""How long a `make demo` run will take, said before it starts (scripts/run_notebooks.py prints it).

Nothing is timed on the spot. The rates come from the last runs of two benchmarks:

    benchmarks/results/course-flickr8k.json   benchmarks/course.py: each notebook's wall time with the
                                              defaults on the Flickr8k sample (MobileNetV2), and where
                                              the time went (encoding, training, evaluation)
    benchmarks/results/encoders.json          benchmarks/encoders.py: the encoders' speeds, measured
                                              side by side on one machine

A simple model scales them to the run asked for, part by part:

  * encoding (notebook 02's vectors, notebook 06's grids): proportional to the photos, and to
    the encoders' speed ratio when the encoder is another;
  * training (03, 05 and 06): proportional to the training photos, because an epoch costs the
    same per caption, with as many epochs as the measured run (early stopping may end sooner or
    later); attention's also to its regions x channels per photo (the grid's cells pooled into
    regions: attention.GRID_POOL), which it projects and attends over;
  * evaluation (05, 06): proportional to the validation photos;
  * the rest (preparing the captions, notebook 04, starting the kernels) as measured.

Downloads are not in it: they depend on the network. The benchmark's own run comes out as it
was measured (tests/test_estimate.py checks this), which shows the parts add up. It does not
show that time grows as the model says with more photos or another encoder, so take the
estimate to within a third or so.
"""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COURSE = REPO / "benchmarks" / "results" / "course-flickr8k.json"
ENCODER_SPEEDS = REPO / "benchmarks" / "results" / "encoders.json"
BUDGETS = ("epochs", "experiment_epochs", "self_critical_epochs", "batch_size", "bucket_width")  # PARAMS that change training


def photos_of_run(parameters):
    """(training photos, validation photos) the run will use, or None when that is unknown
    before it starts (a folder of your own). COCO: the notebooks use every photo on disk, so the
    subset to download (split as download_coco splits it), or more where DATA_DIR/train2017 or
    val2017 already holds more (an older, larger default; all of COCO)."""
    dataset, data_dir = parameters["dataset"], Path(parameters["data_dir"])
    if dataset == "coco":
        from captioning.download import photos_on_disk, subset_sizes
        asked = subset_sizes(parameters["subset_size"] if parameters.get("download") else 0)
        return tuple(max(count, photos_on_disk(data_dir, split)) for split, count in asked.items())
    if dataset == "flickr8k":
        from captioning.public_data import flickr8k_rows
        try:
            rows = flickr8k_rows(data_dir)
        except (OSError, ValueError):
            return None  # notebook 01 will say what is wrong with the folder
        photos = {(split, path) for _, _, path, _, split in rows if Path(path).is_file()}
        return tuple(sum(split == wanted for split, _ in photos) for wanted in ("train", "dev"))
    return None


def notebook_seconds(course, speeds, encoder, train, validation):
    """{notebook: estimated seconds} for `train` training and `validation` validation photos encoded
    with `encoder`, from the course benchmark's results and the encoders' speeds (module docstring)."""
    from captioning.attention import regions_per_side
    from captioning.encoders import ENCODERS

    measured = course["photos"]
    went = course["where_the_time_went"]
    wall = {name[:2]: values["wall_seconds"] for name, values in course["notebooks"].items()}
    relative = speeds["median_images_per_second"]
    measured_encoding = went["printed"]["encoding_seconds"]  # notebook 02's; 06 encodes the same photos' grids
    encoding = measured_encoding * (train + validation) / measured["total"] * relative[course["encoder"]] / relative[encoder]
    more_training, more_validation = train / measured["train"], validation / measured["dev"]
    regions = {name: regions_per_side(spec.grid) ** 2 * spec.channels for name, spec in ENCODERS.items()}
    evaluation = {"05": 0.0, "06": 0.0}
    for folder, values in went["evaluations"].items():
        evaluation["06" if "attention" in folder else "05"] += values["seconds"]

    estimate = {"01": wall["01"], "04": wall["04"]}
    estimate["02"] = wall["02"] - measured_encoding + encoding
    estimate["03"] = wall["03"] * more_training
    estimate["05"] = (wall["05"] - evaluation["05"]) * more_training + evaluation["05"] * more_validation
    attention = wall["06"] - measured_encoding - evaluation["06"]  # 06 encodes the grids, trains, evaluates
    estimate["06"] = (encoding + attention * more_training * regions[encoder] / regions[course["encoder"]]
                      + evaluation["06"] * more_validation)
    return estimate


def estimate_line(parameters, only=None, course_file=COURSE, speeds_file=ENCODER_SPEEDS):
    """The line `make demo` prints before the first notebook, or None when there is nothing to go by."""
    try:
        course = json.loads(Path(course_file).read_text(encoding="utf-8"))
        speeds = json.loads(Path(speeds_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(course, dict) and course.get("complete") and isinstance(speeds, dict)):
        return None  # a benchmark run that is under way or was cut short has left only part of its results
    photos = photos_of_run(parameters)
    if not photos or not all(photos) or parameters["encoder"] not in speeds.get("median_images_per_second", {}):
        return None
    try:
        seconds = notebook_seconds(course, speeds, parameters["encoder"], *photos)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None  # results of another version of the benchmarks: no estimate rather than no run
    chosen = {name: value for name, value in seconds.items() if not only or name in only}
    total = sum(chosen.values()) / 60
    machine = course["machine"]
    line = (f"estimate: about {total:.0f} min for {' '.join(sorted(chosen))} on {photos[0]:,} training and "
            f"{photos[1]:,} validation photos with {parameters['encoder']}"
            f"{', plus the download' if parameters['dataset'] == 'coco' and parameters.get('download') else ''}; "
            f"scaled from benchmarks/course.py's run of {course['date'][:10]} on {machine['cores']} cores "
            f"({machine['cpu_model']}) by scripts/estimate.py, to within a third or so")
    changed = [name for name in BUDGETS if parameters.get(name) is not None]
    if changed:
        line += f"; PARAMS change {', '.join(changed)}: this is the defaults' time"
    return line
