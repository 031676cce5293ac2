"""`python -m stages.cache_teacher`, but pausing after each batch: the crash-resume test's way to SIGKILL a run
mid-way (tests/test_stage1.py). The test seam lives here, not in pipeline/.

    python tests/slow_stage1.py <seconds per batch> <stages.cache_teacher arguments...>
"""
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


if __name__ == "__main__":
    slowed(float(sys.argv[1]))
    from stages.cache_teacher import app

    app(sys.argv[2:], prog_name="stages.cache_teacher")
