"""The suite's own setup: `make test` runs it on two pytest-xdist processes, and tests that share an
expensive fixture (the offline demo, the trained Flickr8k bundle) must run in one of them, or each
process would build the fixture again (conftest.py: test_group)."""

import pytest

from conftest import test_group


def test_tests_that_share_a_fixture_run_in_one_worker(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only under pytest-xdist's --dist loadgroup, as `make test` runs the suite")
    # xdist puts the group at the end of the test's id; the scheduler sends one group to one worker.
    assert request.node.nodeid.endswith("@" + test_group(request.node)), request.node.nodeid


def test_a_test_is_grouped_by_the_shared_fixture_it_uses(request):
    class Item:
        def __init__(self, name, fixturenames):
            self.name, self.fixturenames, self.path = name, fixturenames, request.node.path
    assert test_group(Item("test_x", ["tmp_path", "offline_demo"])) == "offline-demo"
    assert test_group(Item("test_x", ["flickr8k_bundle", "flickr8k_work_dir"])) == "flickr8k-work"
    assert test_group(Item("test_x", ["tmp_path"])) == "test_suite_setup.py"
