"""A realistic load against a running service: 95% reads, 4% updates, 1% batch reads,
user ids from a skewed (Zipf-like) distribution.  It talks HTTP only and imports none
of the service's code.

    make run                     # in one terminal
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 64 -r 16 -t 30s \\
        --host http://127.0.0.1:8080

Settings (environment): LOAD_USERS (id space, default 100000), LOAD_SEGMENTS (how many
LOAD_* segments to create and use, default 20), TOKEN (a bearer token with the read and
write scopes: `make run` prints one), LOAD_RATE_PER_USER (tasks per second per Locust
user, e.g. 8 with -u 64 for about 512 requests/s; default: as fast as answers come).

The skew is steep: user 1 gets 56 % of all requests, user 2 17 %, user 3 8 %, so the
writes are mostly to one user, and they take turns (docs/performance.md, "Writes under
a skewed load").  Locust is a closed loop and needs a good part of a core itself: on a
2-core machine its percentiles include its own and the machine's queueing.
`python -m bench.write_tail` runs this file beside open-loop writes at a fixed rate and
a ceiling, with the CPU of every process.
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, constant_throughput, events, task

USERS = int(os.environ.get("LOAD_USERS", "100000"))
HEADERS = {"Authorization": f"Bearer {os.environ['TOKEN']}"} if os.environ.get("TOKEN") else {}
SEGMENTS = [f"LOAD_{i}" for i in range(int(os.environ.get("LOAD_SEGMENTS", "20")))]
RATE = float(os.environ.get("LOAD_RATE_PER_USER", "0"))


def skewed_user() -> int:
    # Pareto-distributed ranks: a few users are read very often, most rarely.
    return min(USERS, int(random.paretovariate(1.2)))


@events.test_start.add_listener
def create_segments(environment, **_: object) -> None:  # type: ignore[no-untyped-def]
    import urllib.error
    import urllib.request

    for slug in SEGMENTS:
        req = urllib.request.Request(
            f"{environment.host}/v1/segments",
            data=f'{{"slug": "{slug}"}}'.encode(),
            headers={"Content-Type": "application/json", **HEADERS},
        )
        try:
            urllib.request.urlopen(req, timeout=5)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already there from an earlier run
                raise


class SegmentsUser(FastHttpUser):
    # Paced, the offered load stays fixed while the answers slow down (up to the point
    # where every user waits on an answer).
    wait_time = constant_throughput(RATE) if RATE > 0 else between(0, 0.01)
    default_headers = HEADERS

    @task(95)
    def read(self) -> None:
        self.client.get(f"/v1/users/{skewed_user()}/segments", name="/v1/users/[id]/segments")

    @task(4)
    def update(self) -> None:
        add, remove = random.sample(SEGMENTS, 2)
        self.client.post(
            f"/v1/users/{skewed_user()}/segments",
            json={"add": [add], "remove": [remove]},
            name="POST /v1/users/[id]/segments",
        )

    @task(1)
    def batch(self) -> None:
        ids = [skewed_user() for _ in range(100)]
        self.client.post("/v1/users/segments:batch", json={"user_ids": ids}, name="batch of 100")
