"""Fixtures shared by the training tests (test_engine.py, test_train_scripts.py)."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # CUDA tests show as skipped without a GPU, never as passed.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

from voc12.synthetic import generate_dataset


@pytest.fixture
def one_thread():
    # Two cores shared by several test suites: OpenMP spinning with 2 threads is far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    generate_dataset(root, num_train=6, num_val=1, seed=3, size_min=56, size_max=80)
    return str(root)
