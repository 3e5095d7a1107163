"""Ctrl-C during training stops between two steps, never inside one.

Python turns Ctrl-C (SIGINT) into KeyboardInterrupt at whatever line the main thread runs
next. During fit() that line is often TensorFlow's or Keras's own Python, in the middle of
something that has to finish: a step being dispatched, an iterator being made or freed. Cut
there, the process sometimes died instead of stopping (glibc: "corrupted size vs. prev_size",
exit -6), and once carried on as if nothing had been pressed (tests/test_faults.py saw both,
a few times in a hundred). So, inside `between_steps()`, the first Ctrl-C only asks to stop; the
training loop stops at its next step boundary (`stop_if_asked`, or the StopBetweenSteps
callback for fit), by raising the same KeyboardInterrupt a Ctrl-C would, from a line of ours.
A second Ctrl-C interrupts at once, as before.

Nothing changes where Ctrl-C does not mean KeyboardInterrupt: a process that ignores SIGINT (a
job a shell started in the background), a handler of someone else's, a thread other than the
main one. In Jupyter, "interrupt the kernel" is a Ctrl-C, and behaves the same way.
"""

import contextlib
import signal
import threading

from captioning import quiet_tensorflow

quiet_tensorflow()

import keras  # noqa: E402

_asked = []  # the Ctrl-Cs pressed inside the outermost between_steps(), not acted on yet


def _ask(signum, frame):
    if _asked:  # the second Ctrl-C: now
        raise KeyboardInterrupt
    _asked.append(signum)


@contextlib.contextmanager
def between_steps():
    """Inside this block, Ctrl-C stops at the next `stop_if_asked()` (or StopBetweenSteps in
    fit), and at the latest when the block ends. Nested blocks are one block."""
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if not ours:  # nested, ignored, someone else's, or not the main thread: leave it as it is
        yield
        return
    _asked.clear()
    signal.signal(signal.SIGINT, _ask)
    try:
        yield
        stop_if_asked()  # asked during the last step: stop now rather than forget it
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _asked.clear()


def stop_if_asked():
    """Raise KeyboardInterrupt if Ctrl-C was pressed since the block began: a step boundary."""
    if _asked:
        raise KeyboardInterrupt


class StopBetweenSteps(keras.callbacks.Callback):
    """fit()'s step boundaries: after every batch (training or validation) and every epoch.
    Last in the callback list, so an epoch's backup and log are written before it stops."""

    def on_train_batch_end(self, batch, logs=None):
        stop_if_asked()

    def on_test_batch_end(self, batch, logs=None):
        stop_if_asked()

    def on_epoch_end(self, epoch, logs=None):
        stop_if_asked()
