"""Testing tasks without a broker: `worker` is an in-memory stand-in with the real semantics.

``service.testing.worker(tasks=[...])`` runs the worker's own decision code (admission, the
pool child's runner, settling, flows, fan-in, schedules) over an in-memory broker on a
`FakeClock` (`service.testing.memory`). ``service.testing.live.broker_worker`` gives the same
face backed by a real RabbitMQ and a real ``hutch worker``, and the pytest plugin
(`service.testing.pytest_plugin`) hands a test one or the other, so the same test runs both ways.
"""

from __future__ import annotations

from service.testing.memory import FakeClock, MemoryClient, MemoryWorker, Message, worker

__all__ = ["FakeClock", "MemoryClient", "MemoryWorker", "Message", "worker"]
