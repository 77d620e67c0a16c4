"""The benchmark's task bodies (`bench.bodies`) registered as hutch tasks.

The names stay ``bench.tasks.noop`` and ``bench.tasks.spin``: the functions are the very
objects the `multiprocessing.Pool` baseline and the peers run.
"""

from __future__ import annotations

import service
from bench import bodies

noop = service.task(name="bench.tasks.noop")(bodies.noop)
spin = service.task(name="bench.tasks.spin")(bodies.spin)
