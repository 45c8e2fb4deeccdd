"""On ``PYTHONPATH`` in the swapped run only: every Python process RQ's tests start (``rq
worker`` subprocesses, spawned work horses) gets the plugin's classes too."""

import os

if os.environ.get("QRL_RQ_SWAP") == "1":
    import qrl_rq_swap  # noqa: F401 (swaps on import)
