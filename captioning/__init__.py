"""captioning: a small image-captioning library for the course notebooks.

One module per pipeline stage, in the order the notebooks teach them:

    data           COCO / Flickr8k annotations -> a pandas table; the DATASETS table  (notebook 01)
    vocab          caption cleaning, the word <-> id vocabulary, the special ids      (notebook 01)
    download       annotations and image subsets for users online                     (notebook 01)
    encoders       pretrained CNNs that turn a photo into a vector; the ENCODERS table (notebook 02)
    features       a resumable on-disk cache of those vectors                         (notebook 02)
    architectures  the ARCHITECTURES table, build_captioner and the StepDecoder       (notebook 03)
    models         merge and the three inject architectures                           (notebook 03)
    training       tf.data pipelines, the masked loss, fit(), the PRESETS table       (notebook 03)
    self_critical  fine-tuning on CIDEr-D                                             (notebook 03)
    bundle         a trained model saved with its vocabulary and settings             (notebook 03)
    pipeline       the `train` and `evaluate` commands, end to end                    (notebooks 03, 05)
    decoding       batched greedy and beam search, sampling                           (notebook 04)
    evaluation     BLEU, METEOR, ROUGE-L, CIDEr-D, diversity, bootstrap intervals     (notebook 05)
    attention      the soft-attention architecture                                    (notebook 06)
    widgets        what the interactive panels compute: beam table, attention maps   (notebooks 04, 06)
    cli            `python -m captioning ...`

Helpers: layers (layers every architecture shares), images (reading photos),
feature_store (the cache's file format), fileio (atomic writes, the data/work
layout).

Importing this package does not import TensorFlow; the modules that need it
call `quiet_tensorflow()` first so that learners do not see a screen of
C++ start-up logs.
"""

import os
import sys

__version__ = "0.1.0"


def quiet_tensorflow():
    """Import TensorFlow with its C++ start-up log lines silenced, and return it.

    TensorFlow 2.21 prints INFO lines (oneDNN, CUDA stubs) through absl before
    any Python logging is configured, and no environment variable turns them
    off any more. We point the process's stderr at /dev/null for the import
    only, so warnings and errors raised later still reach the user.
    """
    if "tensorflow" in sys.modules:
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
        tf.constant(0)  # the first op initialises the remaining runtime logs
    finally:
        os.dup2(saved_fd, stderr_fd)
        os.close(saved_fd)
        os.close(devnull)
    return tf
