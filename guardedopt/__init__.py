"""guardedopt: why is my model not updating its weights?

Swap `Adam(...)` for `GuardedOptimizer(Adam(...))`: training computes the same
numbers, and every step is checked from inside the compiled step.
"""

from guardedopt.callback import GuardCallback
from guardedopt.class_balance import ClassBalancer
from guardedopt.diagnose import diagnose
from guardedopt.findings import Finding
from guardedopt.findings import Report
from guardedopt.optimizer import GuardError
from guardedopt.optimizer import GuardedOptimizer

__all__ = [
    "ClassBalancer",
    "Finding",
    "GuardCallback",
    "GuardError",
    "GuardedOptimizer",
    "Report",
    "diagnose",
]

__version__ = "0.1.0"
