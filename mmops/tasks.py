"""The task plugin contract's public import path: ``from mmops.tasks import Task, HIGHER, LOWER``.

The class lives in :mod:`mmops.core.tasks`; third-party packages import it from here.
"""

from mmops.core.tasks import HIGHER, LOWER, Task

__all__ = ["HIGHER", "LOWER", "Task"]
