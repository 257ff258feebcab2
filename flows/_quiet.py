"""Keep library chatter out of the ``segflow`` command's terminal.

GDAL (through rasterio), tifffile and nibabel warn about the damaged files whose items
then fail with one line that says the same in words, and every failed block task of such
an item made each Dask worker print "Compute Failed" with a traceback. The command (not
the library, and not the tests) quiets them: Python warnings and these loggers keep only
errors, and the workers of the command's own local cluster keep only critical messages.
``--debug`` shows everything.
"""

from __future__ import annotations

import logging
import os

# Set by the ``segflow`` command (not by tests or library use): its local cluster's workers
# then keep only critical messages (read by flows.cluster when it starts them).
QUIET_WORKERS = False

NOISY_LOGGERS = ("rasterio._env", "rasterio", "tifffile", "nibabel", "py.warnings")


class _NoStateEcho(logging.Filter):
    """Drop Prefect's "Task run failed with state: ..." for an item task that returned its
    Failed state: the item's reason was logged just before, and Prefect logs this line with
    ``exc_info`` but no exception, which prints a stray "NoneType: None"."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Task run failed with state:")


def quiet_libraries() -> None:
    """Route Python warnings to logging and keep only errors of the noisy libraries."""
    logging.getLogger("prefect.task_runs").addFilter(_NoStateEcho())
    logging.captureWarnings(True)
    # GDAL prints with its own handler where rasterio's is not installed (worker threads).
    os.environ.setdefault("CPL_LOG", os.devnull)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def dask_setup(worker: object) -> None:
    """Dask preload hook: the same in each worker of the command's local cluster."""
    quiet_libraries()
