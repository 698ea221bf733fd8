"""Host memory accounting used by long ESA stages."""

import numpy as np

from wa import hostmem


def test_rss_follows_an_allocation_and_release_runs():
    before = hostmem.rss_gib()
    assert before is not None and 0 < before < 1024
    block = np.ones(64 * 2**20, np.float32)   # 256 MiB, touched
    assert hostmem.rss_gib() - before > 0.2
    del block
    hostmem.release()
    assert hostmem.rss_gib() - before < 0.1
