"""The benchmark's task bodies (`bench.bodies`) registered as hutch tasks.

The names stay ``bench.tasks.noop``, ``bench.tasks.spin`` and ``bench.tasks.relay`` (the flows'
no-op step): the functions are the very objects the `multiprocessing.Pool` baseline and the
peers run.
"""

from __future__ import annotations

import service
from bench import bodies

noop = service.task(name="bench.tasks.noop")(bodies.noop)
spin = service.task(name="bench.tasks.spin")(bodies.spin)
relay = service.task(name="bench.tasks.relay")(bodies.relay)
