"""Process-level decisions shared by every server process."""

from __future__ import annotations

import logging
import os
from typing import NoReturn

logger = logging.getLogger(__name__)

EXIT_CODE_REPLICA_BROKEN = 70


def stop_broken_process(error: BaseException) -> NoReturn:
    """DESIGN §2 rule 2: an exception inside apply means the replica is broken. Stop at once,
    without running more requests against state we no longer trust (PySyncObj would retry the
    failing entry forever and stall the whole group)."""
    logger.critical("replica broken, stopping the process: %r", error, exc_info=error)
    logging.shutdown()
    os._exit(EXIT_CODE_REPLICA_BROKEN)
