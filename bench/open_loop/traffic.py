"""What an open-loop run sends: ``path_for`` draws each request (a path to GET, or a
write), e.g. Zipf-skewed user reads or a write mix with hot users."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable

# What ``path_for`` returns: a path to GET, or (method, path, JSON body).
Request = str | tuple[str, str, bytes]
PathFor = Callable[[random.Random], Request]


class ZipfUsers:
    """GET /v1/users/{id}/segments with ids drawn from a Zipf(s) law over ``users``.

    Rank 1 is the hottest user; ranks map to ids by a fixed permutation (a
    multiplicative step coprime with ``users``) so hot users are spread over the id
    space, as real hot users are.  ``hottest(fraction)`` gives the ids of the top ranks.
    Picklable: the table is built lazily in the process that draws.
    """

    def __init__(self, users: int, s: float = 0.99, template: str = "/v1/users/{}/segments"):
        self.users = users
        self.s = s
        self.template = template
        self._cdf: list[float] | None = None
        step = 2_654_435_761 % users or 1
        while math.gcd(step, users) != 1:
            step += 1
        self._step = step

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_cdf": None}

    def user_at(self, rank: int) -> int:
        """The id of the user at ``rank`` (1-based)."""
        return (rank - 1) * self._step % self.users + 1

    def hottest(self, fraction: float) -> list[int]:
        return [self.user_at(r) for r in range(1, max(1, int(self.users * fraction)) + 1)]

    def draw(self, rng: random.Random) -> int:
        if self._cdf is None:
            self._cdf = list(itertools.accumulate(k**-self.s for k in range(1, self.users + 1)))
        rank = bisect.bisect_left(self._cdf, rng.random() * self._cdf[-1]) + 1
        return self.user_at(min(rank, self.users))

    def __call__(self, rng: random.Random) -> Request:
        return self.template.format(self.draw(rng))


class WriteMix:
    """POST /v1/users/{id}/segments adding one of ``slugs`` and removing another:
    ``hot_share`` of them to the ``hot_fraction`` hottest users of ``zipf``, the rest to
    anyone.  Picklable."""

    def __init__(
        self, zipf: ZipfUsers, slugs: list[str], hot_share: float = 0.5, hot_fraction: float = 0.01
    ) -> None:
        self.users = zipf.users
        self.hot = zipf.hottest(hot_fraction)
        self.hot_share = hot_share
        self.slugs = slugs

    def __call__(self, rng: random.Random) -> Request:
        hot = rng.random() < self.hot_share
        uid = rng.choice(self.hot) if hot else rng.randint(1, self.users)
        add, remove = rng.sample(self.slugs, 2)
        body = b'{"add":["%s"],"remove":["%s"]}' % (add.encode(), remove.encode())
        return ("POST", f"/v1/users/{uid}/segments", body)
