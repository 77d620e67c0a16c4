"""Peer task queues run by ``bench/run.py --peers``: Celery and Dramatiq apps with the same task
bodies (`bench.bodies`), each configured as its documentation recommends for at-least-once.

These modules import nothing from hutch: each runs in processes of its own (the peer's worker,
a client that fills its queue or makes calls), started and stopped by `bench.peer_workloads`.
"""
