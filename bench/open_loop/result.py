"""What an open-loop run measured, and whether the generator kept its own schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

# Lateness of the generator's own timer beyond which the run does not measure the server.
BEHIND_LAG_P99_S = 0.002


@dataclass(frozen=True)
class OpenLoopResult:
    rate: float  # offered, requests/s
    seconds: float
    sent: int
    ok: int
    errors: int  # non-2xx, connection errors, and requests unanswered at the end
    statuses: dict[int, int]  # non-2xx status -> count
    achieved_rate: float  # sent / the time the sending took
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    send_lag_p99_ms: float  # the generator's timer against the schedule
    send_lag_max_ms: float
    generator_cpu: float  # cores used by the generator process (CPU s / wall s)
    connections: int
    started_at: float  # time.time() of the first intended send
    ended_at: float  # time.time() once every response was in (or given up)
    # p99 latency (ms) of the requests due in each second of the run.
    p99_per_second: list[float] = field(default_factory=list)

    @property
    def behind(self) -> bool:
        """The generator could not keep the schedule itself."""
        return self.achieved_rate < 0.98 * self.rate or self.send_lag_p99_ms > (
            BEHIND_LAG_P99_S * 1000
        )

    def summary(self) -> str:
        text = (
            f"p50 {self.p50_ms:.2f} ms  p99 {self.p99_ms:.2f} ms  p99.9 {self.p999_ms:.2f} ms"
            f"  max {self.max_ms:.1f} ms  errors {self.errors}  sent {self.sent:,}"
            f" at {self.achieved_rate:,.0f}/s (offered {self.rate:,.0f}/s)"
            f"  generator {self.generator_cpu:.2f} cores,"
            f" send lag p99 {self.send_lag_p99_ms:.2f} ms"
        )
        if self.statuses:
            text += "  statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        if self.behind:
            text += "  GENERATOR BEHIND: these figures are the generator's, not the server's"
        return text
