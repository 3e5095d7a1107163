"""Execute the course notebooks end to end on the real sample data, as `make demo` does.

The Flickr8k chain 01 -> 05 runs in order in one work folder (each notebook
reads what the one before it saved), with the shared MobileNetV2 weights and
no downloads. Notebook 01 also runs on the COCO val2017 sample: the full
official annotation file with 159 images on disk.
"""

import json

import pytest

import run_notebooks

pytestmark = pytest.mark.slow

# Small budgets so the whole chain stays within a few minutes on a 2-core CPU.
CI_BUDGET = {"epochs": 4, "experiment_epochs": 3}
_completed = set()  # prefixes of the chain notebooks that ran cleanly in this session


def _outputs_text(notebook_path):
    notebook = json.loads(notebook_path.read_text())
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if "text" in output:
                texts.append("".join(output["text"]))
            texts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts), notebook


def _assert_taught(notebook):
    """Each notebook teaches: prose first, at least one figure, a closing 'what to try'."""
    cells = notebook["cells"]
    assert cells[0]["cell_type"] == "markdown", "a notebook starts by saying what it covers"
    assert "try" in "".join(cells[-1]["source"]).lower(), "a notebook ends with what to try"
    figures = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, "a notebook explains with at least one plot"


@pytest.fixture(scope="module")
def flickr8k_parameters(flickr8k_dir, mobilenet_weights, flickr8k_work_dir):
    # The work folder the CLI tests use: notebook 02 and 06 then find the feature caches
    # that `train` filled (320 px mirrored features take a minute per cache here).
    return {
        "dataset": "flickr8k",
        "data_dir": str(flickr8k_dir),
        "work_dir": str(flickr8k_work_dir),
        "encoder": "mobilenet_v2",
        "weights": str(mobilenet_weights),
        "download": False,
        **CI_BUDGET,
    }


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("prefix", ["01", "02", "03", "04", "05", "06"])
def test_flickr8k_notebook_chain(prefix, flickr8k_parameters, runs_dir):
    if prefix != "01" and f"{int(prefix) - 1:02d}" not in _completed:
        pytest.skip(f"notebook {int(prefix) - 1:02d} did not run, and {prefix} needs its output")
    if not run_notebooks.notebook_paths([prefix]):
        pytest.fail(f"notebooks/{prefix}_*.ipynb is missing")
    [executed] = run_notebooks.run(flickr8k_parameters, runs_dir, only=[prefix], log=lambda *_: None)
    text, notebook = _outputs_text(executed)
    _assert_taught(notebook)
    assert "Traceback" not in text
    assert "oneDNN custom operations" not in text, "TensorFlow start-up noise leaked into the notebook"
    _completed.add(prefix)


def test_data_preparation_notebook_on_coco(coco_val_dir, tmp_path):
    parameters = {"dataset": "coco", "data_dir": str(coco_val_dir), "work_dir": str(tmp_path / "work"),
                  "download": False}
    [executed] = run_notebooks.run(parameters, tmp_path / "runs", only=["01"], log=lambda *_: None)
    text, notebook = _outputs_text(executed)
    _assert_taught(notebook)
    # The full official val2017 file: 5,000 images and 25,014 captions, of which 159 images are on disk.
    assert "25,014" in text or "25014" in text
    assert "159" in text
