"""``diagnostics.every``'s schedule: every N-th round, never, or ``auto`` (every
round while the diagnostic is cheap, else within half the rest of the
aggregation's seconds)."""

from __future__ import annotations

from fedlora.diagnostics import DiagnosticSchedule


def test_every_n_measures_rounds_n_2n_and_zero_never():
    third = DiagnosticSchedule(3)
    assert [r for r in range(1, 10) if third.due(r)] == [3, 6, 9]
    assert not any(DiagnosticSchedule(0).due(r) for r in range(1, 10))
    assert DiagnosticSchedule(3).skipped() == (
        "diagnostics.every=3: measured in rounds 3, 6, ..."
    )


def play(schedule: DiagnosticSchedule, rest: float, diagnostic: float, rounds: int):
    """The rounds that measure when each aggregation's other work takes ``rest``
    seconds and a diagnostic ``diagnostic`` seconds."""
    measured = []
    for r in range(1, rounds + 1):
        due = schedule.due(r)
        measured += [r] if due else []
        schedule.record(
            rest + (diagnostic if due else 0.0), diagnostic if due else None
        )
    return measured


def test_auto_measures_every_round_while_the_diagnostic_is_cheap():
    # a diagnostic five times the rest of the round, but of 40 ms: every round
    assert play(DiagnosticSchedule("auto"), 0.008, 0.04, 20) == list(range(1, 21))
    # of 70 ms (over AUTO_FREE_SECONDS): within half the rest only
    assert play(DiagnosticSchedule("auto"), 0.012, 0.07, 20) == [1, 13]


def test_auto_holds_a_costly_diagnostic_within_the_rest_of_the_aggregation():
    # LLM shapes: 3 s of diagnostic against 0.5 s of the rest of the round
    schedule = DiagnosticSchedule("auto")
    measured = play(schedule, 0.5, 3.0, 60)
    assert measured[0] == 1  # the first round measures, to learn its cost
    assert measured == list(range(1, 61, 12))  # twelve rounds of rest pay for one
    # on average the diagnostic adds at most half the server's time, plus one run
    assert schedule.spent <= 0.5 * schedule.rest + 3.0
    assert schedule.skipped().startswith(
        "diagnostics.every=auto: skipped to keep the diagnostic's 15.0 s so far "
        "within 0.5 of the rest of the server's aggregation (30.0 s"
    )


def test_auto_measures_again_once_the_diagnostic_is_cheap_again():
    schedule = DiagnosticSchedule("auto")
    schedule.record(5.5, 5.0)  # one costly diagnostic (a loaded machine)
    assert not schedule.due(2)
    schedule.record(0.5, None)
    schedule.free_seconds = 10.0  # as if the last one had been cheap
    assert schedule.due(3)
