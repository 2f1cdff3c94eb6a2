import os

# Tests run on CPU with small shapes; keep each worker to one thread so `pytest -n 2` does not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)

# The long files first, so that `pytest -n 2 --dist loadfile` (the Makefile's default) starts them early and
# the short ones fill the other worker; the SLURM test mostly waits on the scheduler's polling.
SLOW_FIRST = ("cluster/test_slurm.py", "test_workflow.py", "test_faults.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(SLOW_FIRST) if path.endswith(name)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the order inside a file is kept
