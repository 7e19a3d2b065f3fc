"""A realistic load against a running service: 95% reads, 4% updates, 1% batch reads,
user ids from a skewed (Zipf-like) distribution.  It talks HTTP only and imports none
of the service's code.

    make run                     # in one terminal
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 64 -r 16 -t 30s \\
        --host http://127.0.0.1:8080

Settings (environment): LOAD_USERS (id space, default 100000), LOAD_SEGMENTS (how many
LOAD_* segments to create and use, default 20), TOKEN (a bearer token with the read and
write scopes: `make run` prints one).
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, events, task

USERS = int(os.environ.get("LOAD_USERS", "100000"))
HEADERS = {"Authorization": f"Bearer {os.environ['TOKEN']}"} if os.environ.get("TOKEN") else {}
SEGMENTS = [f"LOAD_{i}" for i in range(int(os.environ.get("LOAD_SEGMENTS", "20")))]


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
    wait_time = between(0, 0.01)
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
