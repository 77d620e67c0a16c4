"""The per-host process pool: the supervisor (`supervisor.Pool`), the records it moves
(`jobs`), the rule for queueing behind short tasks (`pipelining`), the pipe protocol (`pipe`)
and the child process (`child`, run as ``python -m service.pool.child``).

Nothing here talks to the broker, and a child imports only `child`, `pipe`, `jobs` and what the
task modules need: this package's ``__init__`` imports nothing, so that stays true.
"""
