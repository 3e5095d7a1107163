"""What the prose says the package does, held against the package.

Notebooks, the README and the teacher's guide state defaults in words: "the preset's 30 epochs",
"beam_search's own α (0.7)", "about 2.6 times as fast". Each such statement is read here with a
pattern and compared with the value the package (or, for a speed, the one benchmark that
measures it) has, so that changing a default without the prose fails a test. No TensorFlow
work: the package is imported for its tables only.
"""

import inspect
import json
import re
from pathlib import Path

import pytest

from captioning import bundle, cli, decoding, evaluate
from captioning.attention import GRID_POOL
from captioning.download import SUBSET_SIZE
from captioning.training import PRESETS

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
DOCS = [REPO / "README.md", REPO / "docs" / "teaching.md", REPO / "captioning" / "encoders.py"]
PRESET = PRESETS["cpu-small"]  # what the notebooks and `train` use unless told otherwise


def _texts():
    """(where, text): every cell of every notebook, and each document, with its lines joined so that
    a statement broken over two lines is read whole."""
    for path in NOTEBOOKS:
        for index, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            yield f"{path.name} cell {index}", " ".join("".join(cell["source"]).split())
    for path in DOCS:
        yield path.name, " ".join(path.read_text(encoding="utf-8").split())


def _stated(pattern):
    """(where, number) for each match of `pattern`: its first group that matched, without thousands' commas."""
    return [(where, next(group for group in match.groups() if group is not None).replace(",", ""))
            for where, text in _texts() for match in re.finditer(pattern, text)]


# pattern (its group: the number stated) -> the value the package has
STATEMENTS = {
    "teacher-forcing epochs": (r"preset's (\d+) epochs(?! of (?:self-critical |CIDEr-D )?fine-tuning)",
                               PRESET["epochs"]),
    "fine-tuning epochs": (r"(\d+) epochs of (?:self-critical |CIDEr-D )?fine-tuning", PRESET["self_critical_epochs"]),
    "beam_search's own length exponent": (r"DEFAULT_LENGTH_ALPHA`? \(([\d.]+)", decoding.DEFAULT_LENGTH_ALPHA),
    "cells per side of an attention region": (r"(\d+) x \1 blocks?\b", GRID_POOL),  # "each 2 x 2 block of cells"
    # "a 1,800-image subset", notebook 01's parameters cell and the README's table of make demo's settings
    "COCO photos downloaded": (r"\b(\d[\d,]*)-image subset|subset_size = (\d+) +#|\| `SUBSET` \| `(\d+)`", SUBSET_SIZE),
}


@pytest.mark.parametrize("name", STATEMENTS)
def test_the_prose_states_the_package_defaults(name):
    pattern, value = STATEMENTS[name]
    stated = _stated(pattern)
    assert stated, f"no statement of the {name} found: the pattern {pattern!r} is stale"
    wrong = [(where, number) for where, number in stated if float(number) != float(value)]
    assert not wrong, f"the package's {name} is {value}, the prose says otherwise: {wrong}"


def test_every_beam_width_default_is_one_number():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    widths = {f"`{command} --beam`": commands[command].get_default("beam") for command in ("caption", "evaluate", "export")}
    widths["Captioner.caption_features"] = inspect.signature(bundle.Captioner.caption_features).parameters["beam_width"].default
    widths["evaluate_bundle"] = inspect.signature(evaluate.evaluate_bundle).parameters["beam_width"].default
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                for match in re.finditer(r"^beam_width = (\d+)", "".join(cell["source"]), re.MULTILINE):
                    widths[f"{path.name} parameter"] = int(match.group(1))
    assert len(widths) >= 7 and set(widths.values()) == {3}, widths
    # ...and the prose's "caption --beam N" is that one width.
    assert {int(number) for _, number in _stated(r"caption (?:--model \S+ )?--beam (\d+)")} == {3}


def test_encoder_speed_is_stated_as_benchmarks_encoders_measured_it():
    # benchmarks/encoders.py writes its last run to this file; scripts/estimate.py reads the same one.
    recorded = json.loads((REPO / "benchmarks" / "results" / "encoders.json").read_text(encoding="utf-8"))
    measured = round(recorded["speed_vs_inception_v3"]["mobilenet_v2"], 1)
    stated = _stated(r"(?:MobileNetV2|mobilenet_v2)[^.]*?about ([\d.]+) times as fast")
    assert len(stated) >= 3, stated  # the README, notebook 02 and encoders.py
    assert {float(number) for _, number in stated} == {measured}, (measured, stated)
    # No other way of putting it ("3.5x faster", "half as fast") survives anywhere.
    assert not _stated(r"(\d[\d.]*x faster|(?:half|twice) as fast|\d[\d.]* times faster)(?=[^.]*(?:MobileNet|Inception|encod))")


def test_the_caption_quality_the_prose_states_is_the_one_measured():
    # One number for "how good is the default": docs/experiments.md's eight-seed mean, which the
    # README, the teacher's guide and notebook 03 round (they once said 0.40, 0.41 and "about 0.4").
    recorded = re.search(r"The default `train` now scores a dev CIDEr-D of ([\d.]+)",
                         " ".join((REPO / "docs" / "experiments.md").read_text(encoding="utf-8").split()))
    assert recorded, "docs/experiments.md records no eight-seed mean of the default"
    stated = _stated(r"dev CIDEr-D of about ([\d.]+)")
    assert len(stated) >= 3, stated
    assert {float(number) for _, number in stated} == {round(float(recorded.group(1)), 2)}, (recorded.group(1), stated)
