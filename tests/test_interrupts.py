"""Ctrl-C inside training stops at the next step boundary, never inside a step (interrupts.py).

The command-line path (a real SIGINT to `train`, exit 130, the rerun resumes) is
tests/test_faults.py::test_ctrl_c_says_what_was_kept_and_the_rerun_resumes; these pin the rules.
"""

import signal

import numpy as np
import pytest

from captioning.interrupts import StopBetweenSteps, between_steps, stop_if_asked


@pytest.fixture(autouse=True)
def python_ctrl_c():
    """Ctrl-C as a command typed at a prompt has it (a test runner may have changed it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_the_first_ctrl_c_waits_for_the_step_boundary():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with between_steps():
            signal.raise_signal(signal.SIGINT)
            reached.append("the rest of the step")  # not cut here
            stop_if_asked()
            reached.append("the next step")
    assert reached == ["the rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_stops_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with between_steps():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the first")
            signal.raise_signal(signal.SIGINT)
            reached.append("after the second")
    assert reached == ["after the first"]


def test_a_ctrl_c_in_the_last_step_is_not_forgotten():
    with pytest.raises(KeyboardInterrupt):
        with between_steps():
            signal.raise_signal(signal.SIGINT)
    with between_steps():  # and the next block starts afresh
        stop_if_asked()


def test_nested_blocks_are_one_block_and_the_handler_comes_back():
    with pytest.raises(KeyboardInterrupt):
        with between_steps():
            with between_steps():
                signal.raise_signal(signal.SIGINT)
            stop_if_asked()  # the inner block's end did not act on it, nor forget it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_process_that_ignores_ctrl_c_keeps_ignoring_it():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with between_steps():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        stop_if_asked()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_fit_stops_after_the_batch_in_which_ctrl_c_came():
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")

    class CtrlC(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                signal.raise_signal(signal.SIGINT)

    x, y = np.zeros((40, 3), "float32"), np.zeros((40, 1), "float32")
    with pytest.raises(KeyboardInterrupt):
        with between_steps():
            model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[CtrlC(), StopBetweenSteps()])
    assert int(model.optimizer.iterations.numpy()) == 3  # batches 0, 1 and 2: the third one finished
