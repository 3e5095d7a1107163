"""The time `make demo` says a run will take before it starts (scripts/estimate.py), from the
benchmarks' committed results. `make demo` printing it is checked by the demo tests in test_readme.py."""

import json
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import estimate  # noqa: E402

from captioning.download import SUBSET_SIZE, subset_sizes  # noqa: E402

COURSE = json.loads(estimate.COURSE.read_text())
SPEEDS = json.loads(estimate.ENCODER_SPEEDS.read_text())
# A fresh download: no photo on disk yet (scripts/estimate.py counts the photos a folder already holds).
ONLINE_DEFAULT = {"dataset": "coco", "data_dir": "/nonexistent/data/coco", "subset_size": SUBSET_SIZE,
                  "encoder": "inception_v3", "download": True}
ONLINE_PHOTOS = tuple(subset_sizes(SUBSET_SIZE).values())  # (train, val)


def test_the_benchmark_s_own_run_comes_out_as_it_was_measured():
    # The parts the model scales (encoding, training, evaluation) and the rest add up to each notebook's time.
    photos = COURSE["photos"]
    estimated = estimate.notebook_seconds(COURSE, SPEEDS, COURSE["encoder"], photos["train"], photos["dev"])
    measured = {name[:2]: values["wall_seconds"] for name, values in COURSE["notebooks"].items()}
    assert estimated.keys() == measured.keys()
    for name in measured:
        assert estimated[name] == pytest.approx(measured[name], rel=1e-9), name


def test_more_photos_and_a_slower_encoder_take_longer_by_the_measured_rates():
    photos = COURSE["photos"]
    small = estimate.notebook_seconds(COURSE, SPEEDS, COURSE["encoder"], photos["train"], photos["dev"])
    double = estimate.notebook_seconds(COURSE, SPEEDS, COURSE["encoder"], 2 * photos["train"], 2 * photos["dev"])
    assert double["01"] == small["01"] and double["04"] == small["04"]  # as measured: no photos in them
    for name in ("02", "03", "05", "06"):
        assert small[name] < double[name] < 2 * small[name] + 1e-9, name  # each has a part that does not grow
    rates = SPEEDS["median_images_per_second"]
    slower = min(rates, key=rates.get)
    if slower != COURSE["encoder"]:
        other = estimate.notebook_seconds(COURSE, SPEEDS, slower, photos["train"], photos["dev"])
        encoding = COURSE["where_the_time_went"]["printed"]["encoding_seconds"]  # the measured photos' encoding
        assert other["02"] - small["02"] == pytest.approx(encoding * (rates[COURSE["encoder"]] / rates[slower] - 1))


def test_the_line_names_the_run_and_the_budgets_params_change():
    line = estimate.estimate_line(ONLINE_DEFAULT)
    assert re.fullmatch(r"estimate: about \d+ min for 01 02 03 04 05 06 on {:,} training and {:,} validation "
                        r"photos with inception_v3, plus the download; scaled from .*".format(*ONLINE_PHOTOS), line)
    assert "PARAMS" not in line
    assert "about" in estimate.estimate_line(dict(ONLINE_DEFAULT, subset_size=500), only=["02", "03"])
    assert estimate.estimate_line(dict(ONLINE_DEFAULT, epochs=2)).endswith("PARAMS change epochs: this is the "
                                                                          "defaults' time")
    assert estimate.estimate_line(dict(ONLINE_DEFAULT, dataset="csv")) is None  # your own folder: unknown
    assert estimate.estimate_line(ONLINE_DEFAULT, course_file=REPO / "missing.json") is None


def test_coco_photos_already_on_disk_count_where_there_are_more_than_the_subset(tmp_path):
    # The notebooks train on every photo on disk: a folder holding an older, larger default's photos
    # (2,000), or all of COCO, takes longer than the subset the run downloads.
    for split, count in (("train", ONLINE_PHOTOS[0] + 160), ("val", 10)):
        (tmp_path / f"{split}2017").mkdir()
        for number in range(count):
            (tmp_path / f"{split}2017" / f"{number:012d}.jpg").touch()
    (tmp_path / "train2017" / "notes.txt").touch()  # not a photo
    folder = dict(ONLINE_DEFAULT, data_dir=str(tmp_path))
    assert estimate.photos_of_run(folder) == (ONLINE_PHOTOS[0] + 160, ONLINE_PHOTOS[1])
    line = estimate.estimate_line(folder)
    assert f"on {ONLINE_PHOTOS[0] + 160:,} training and {ONLINE_PHOTOS[1]:,} validation" in line
    assert estimate.photos_of_run(dict(folder, download=False)) == (ONLINE_PHOTOS[0] + 160, 10)  # only what is there
    empty = tmp_path / "empty"
    empty.mkdir()
    assert estimate.estimate_line(dict(folder, data_dir=str(empty), download=False)) is None  # nothing to go by
    (empty / "train2017").write_text("a file, not a folder")
    assert estimate.photos_of_run(dict(folder, data_dir=str(empty))) == ONLINE_PHOTOS  # notebook 01 says what is wrong


def test_a_course_benchmark_under_way_leaves_no_estimate_and_the_run_goes_on(tmp_path):
    # benchmarks/course.py rewrites its results after each notebook, and runs `make demo` meanwhile:
    # the estimate of that very run read the half-written file and stopped it with a KeyError.
    partial = {key: value for key, value in COURSE.items() if key != "where_the_time_went"}
    for complete in (False, True):
        (tmp_path / "course.json").write_text(json.dumps(dict(partial, complete=complete)))
        assert estimate.estimate_line(ONLINE_DEFAULT, course_file=tmp_path / "course.json") is None
    (tmp_path / "course.json").write_text("[]")
    assert estimate.estimate_line(ONLINE_DEFAULT, course_file=tmp_path / "course.json") is None


def test_the_readme_states_the_online_default_s_estimate():
    minutes = round(sum(estimate.notebook_seconds(COURSE, SPEEDS, "inception_v3", *ONLINE_PHOTOS).values()) / 60)
    assert f"about {minutes} min" in estimate.estimate_line(ONLINE_DEFAULT)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"about {minutes} min on two cores" in readme, "README's estimate of the online default is stale"
