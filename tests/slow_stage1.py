"""`python -m stages.cache_teacher`, but pausing after each batch: the crash-resume test's way to SIGKILL a run
mid-way (tests/test_stage1.py). The test seam lives here, not in pipeline/.

    python tests/slow_stage1.py <seconds per batch> <stages.cache_teacher arguments...>

Env SLOW_STAGE1_OPEN_DELAY=<seconds>: ranks > 0 of a torchrun job wait that long before opening the store, so rank 0
is far ahead of them (tests/test_parallel_stage1.py).
"""

import os
import sys
import time

from pipeline.teacher import cache_teacher


def slowed(delay: float):
    """Wrap cache_teacher.teacher_rows (called once per batch) so each call sleeps `delay` s after computing."""
    rows = cache_teacher.teacher_rows

    def teacher_rows(*args, **kw):
        out = rows(*args, **kw)
        time.sleep(delay)
        return out

    cache_teacher.teacher_rows = teacher_rows


def late_ranks(delay: float):
    """Ranks > 0 open the store `delay` s late."""
    from cache import CacheWriter

    opened = CacheWriter.open.__func__

    def open_late(cls, *args, **kw):
        time.sleep(delay)
        return opened(cls, *args, **kw)

    CacheWriter.open = classmethod(open_late)


if __name__ == "__main__":
    slowed(float(sys.argv[1]))
    if os.environ.get("SLOW_STAGE1_OPEN_DELAY"):
        late_ranks(float(os.environ["SLOW_STAGE1_OPEN_DELAY"]))
    from stages.cache_teacher import app

    app(sys.argv[2:], prog_name="stages.cache_teacher")
