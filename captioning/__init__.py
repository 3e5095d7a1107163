"""captioning: a small image-captioning library for the course notebooks.

One module per pipeline stage. Read these: they are what the notebooks teach,
in the notebooks' order, and each is a few hundred lines of ideas.

    vocab          caption cleaning, the word <-> id vocabulary, the special ids      (notebook 01)
    encoders       pretrained CNNs that turn a photo into a vector; the ENCODERS table (notebook 02)
    architectures  the ARCHITECTURES table, build_captioner and the StepDecoder       (notebook 03)
    layers         the word layers every architecture shares                          (notebook 03)
    models         merge and the three inject architectures                           (notebook 03)
    training       tf.data pipelines, the masked loss, fit(), the PRESETS table       (notebook 03)
    self_critical  fine-tuning on CIDEr-D                                             (notebook 03)
    decoding       batched greedy and beam search, sampling                           (notebook 04)
    beams          beam search as TensorFlow ops: the one search, compiled and exported (notebook 04)
    cider          CIDEr-D: the score, and fine-tuning's reward                       (notebooks 03, 05)
    evaluation     BLEU, METEOR, ROUGE-L, CIDEr-D, diversity, bootstrap intervals     (notebook 05)
    attention      the soft-attention architecture                                    (notebook 06)

Plumbing: files, downloads, caches, bundles, commands. Needed, not taught; skip
them on a first reading.

    data           COCO / Flickr8k / your own annotations -> a pandas table; DATASETS (notebook 01)
    public_data    the official files: COCO's JSON, Flickr8k's text files, Karpathy's (notebook 01)
    own_data       a folder of your own photos with captions.csv                      (notebook 01)
    download       annotations and image subsets for users online                     (notebook 01)
    images         reading photos, checked at the door
    features       a resumable on-disk cache of the encoders' vectors                 (notebook 02)
    feature_jobs   how one caching job runs: what changed, chunks, the lock, resuming (notebook 02)
    feature_store  that cache's file format
    bundle         a trained model saved with its vocabulary and settings             (notebook 03)
    pipeline       the `train` command end to end                                     (notebook 03)
    runs           a run's identity, and the teacher-forced model it keeps for others (notebooks 03, 05)
    evaluate       the `evaluate` command: a bundle scored on a split                 (notebook 05)
    export         a bundle as a SavedModel or .tflite that runs without this package (notebook 04)
    cluster        multi-worker start-up: waiting for the peers TF_CONFIG names
    widgets        what the interactive panels compute: beam table, attention maps   (notebooks 04, 06)
    fileio         atomic writes, the data/work layout
    interrupts     Ctrl-C during training stops between two steps, never inside one
    cli            `python -m captioning ...`

Importing this package does not import TensorFlow; the modules that need it
call `quiet_tensorflow()` first so that learners do not see a screen of
C++ start-up logs.
"""

import json
import os
import sys

__version__ = "0.1.0"


_MULTI_WORKER = []  # the MultiWorkerMirroredStrategy, once made (see quiet_tensorflow)


def quiet_tensorflow(multi_worker=False):
    """Import TensorFlow with its C++ start-up log lines silenced, and return it.

    TensorFlow 2.21 prints INFO lines (oneDNN, CUDA stubs) through absl before
    any Python logging is configured, and no environment variable turns them
    off any more. We point the process's stderr at /dev/null for the import
    only, so warnings and errors raised later still reach the user.

    multi_worker=True also makes the tf.distribute.MultiWorkerMirroredStrategy
    of this process (its peers are in the TF_CONFIG environment variable), which
    TensorFlow only allows before the first operation runs: `train --distribute
    multi-worker` calls this first thing. multi_worker_strategy() returns it.
    """
    if "tensorflow" in sys.modules:
        if multi_worker and not _MULTI_WORKER:
            raise RuntimeError("the multi-worker strategy must be made before TensorFlow runs anything: "
                               "call quiet_tensorflow(multi_worker=True) first")
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Always file descriptor 2, the one the C++ runtime writes to: inside a
    # Jupyter kernel sys.stderr.fileno() is a copy, and the kernel forwards fd 2
    # itself into the notebook.
    stderr_fd = 2
    saved_fd = os.dup(stderr_fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, stderr_fd)
        import tensorflow as tf
        if multi_worker:
            _MULTI_WORKER.append(_multi_worker_class(tf)())
        tf.constant(0)  # the first op initialises the remaining runtime logs
    finally:
        os.dup2(saved_fd, stderr_fd)
        os.close(saved_fd)
        os.close(devnull)
    return tf


def _multi_worker_class(tf):
    """tf.distribute.MultiWorkerMirroredStrategy with the reduce() Keras 3's fit() expects.

    With two or more workers, fit() asks the strategy to reduce (1) a whole
    batch at once, to learn its shapes, which TensorFlow's collective reduce
    refuses for a structure of tensors (ours: a dict of inputs and the targets;
    keras-team/keras#20329), and (2) each step's scalar loss and metrics "over
    axis 0", which a scalar does not have. Reducing each tensor on its own, and
    a scalar across the workers only, is what both mean.
    """
    class KerasFriendlyStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def reduce_one(one):
                local = self.experimental_local_results(one)[0]
                scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
                return super(KerasFriendlyStrategy, self).reduce(reduce_op, one, None if scalar else axis)
            return tf.nest.map_structure(reduce_one, value)

    return KerasFriendlyStrategy


def tf_config_problem(text):
    """What is wrong with the TF_CONFIG environment variable (None: nothing, or not set: one worker).
    TensorFlow would answer a malformed one with a traceback, or wait for peers that do not exist."""
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        return f"is not JSON ({error})"
    if not isinstance(config, dict):
        return f"must be a JSON object with \"cluster\" and \"task\", not {type(config).__name__}"
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(hosts, list) and hosts and all(isinstance(host, str) and ":" in host for host in hosts)
            for hosts in cluster.values()):
        return 'needs "cluster": {"worker": ["host:port", ...], ...}, each role a list of "host:port" addresses'
    if not isinstance(task, dict) or task.get("type") not in cluster:
        return f'needs "task": {{"type": one of {sorted(cluster)}, "index": N}}, this machine\'s role'
    index, hosts = task.get("index"), cluster[task["type"]]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(hosts):
        return f'"task" "index" must be 0 to {len(hosts) - 1} (the {task["type"]} list has {len(hosts)}), got {index!r}'
    return None


def multi_worker_strategy():
    """The strategy quiet_tensorflow(multi_worker=True) made, or None."""
    return _MULTI_WORKER[0] if _MULTI_WORKER else None
