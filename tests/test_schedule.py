"""How long a run trains: it follows validation (patience, then a cool-down) within ceilings in steps, epochs and
time, evaluates at least once per epoch, and its learning rate never needs the end in advance."""

from __future__ import annotations

import pytest

from langops.config import ConfigError, TrainConfig, parse_params
from langops.schedule import Cooldown, Schedule

pytestmark = pytest.mark.unit


def _schedule(**overrides) -> Schedule:
    values = dict(batches_per_epoch=100, patience=3, min_steps=0, max_steps=10_000, warmup_steps=0,
                  cooldown_fraction=0.2, eval_every_steps=None)
    values.update(overrides)
    return Schedule(**values)


def _verdict(schedule: Schedule, *, steps: int, bad: int = 0, seconds: float = 0.0, per_step: float = 0.1,
             cooldown: Cooldown | None = None):
    return schedule.after_evaluation(steps=steps, bad_evaluations=bad, seconds=seconds, seconds_per_step=per_step,
                                     cooldown=cooldown)


def test_a_run_that_keeps_improving_goes_on_past_any_epoch_count():
    schedule = _schedule()
    for epoch in range(1, 40):  # 39 epochs, each one better than the last: no verdict but "go on"
        verdict = _verdict(schedule, steps=100 * epoch)
        assert verdict.stop is None and verdict.cooldown is None


def test_patience_begins_a_cool_down_and_its_end_stops_the_run():
    schedule = _schedule()
    assert _verdict(schedule, steps=700, bad=2).cooldown is None
    cooldown = _verdict(schedule, steps=800, bad=3).cooldown
    assert cooldown == Cooldown(start=800, steps=160, reason="patience")  # 20 % of the 800 steps before it
    assert _verdict(schedule, steps=900, bad=4, cooldown=cooldown).stop is None  # cooling down, whatever validation says
    assert _verdict(schedule, steps=960, bad=0, cooldown=cooldown).stop == "patience"


def test_without_a_cool_down_patience_stops_at_once():
    assert _verdict(_schedule(cooldown_fraction=0), steps=800, bad=3).stop == "patience"


def test_small_datasets_are_not_stopped_by_patience_before_min_steps():
    schedule = _schedule(batches_per_epoch=10, min_steps=300)
    assert _verdict(schedule, steps=200, bad=5) == _verdict(schedule, steps=200)  # go on
    assert _verdict(schedule, steps=300, bad=5).cooldown == Cooldown(start=300, steps=60, reason="patience")


def test_the_step_ceiling_has_its_cool_down_end_exactly_there():
    schedule = _schedule(max_steps=1200)
    planned = schedule.ceiling_cooldown()
    assert planned == Cooldown(start=1000, steps=200, reason="step ceiling")  # 200 is 20 % of the 1000 before it
    assert schedule.cooldown_for(999, None) is None and schedule.cooldown_for(1000, None) == planned
    assert schedule.evaluates_at(position=0, steps=1200, cooldown=planned)
    assert _verdict(schedule, steps=1200, cooldown=planned).stop == "step ceiling"


def test_the_epoch_ceiling_is_a_step_ceiling_counted_in_passes():
    schedule = _schedule(max_epochs=3)
    assert schedule.ceiling == (300, "epoch ceiling")
    assert _verdict(_schedule(max_epochs=3, cooldown_fraction=0), steps=300).stop == "epoch ceiling"


def test_the_time_ceiling_cools_down_before_it_is_reached_and_stops_once_it_is():
    schedule = _schedule(max_steps=None, max_seconds=600.0)
    # 1 s a step: 100 steps to the next evaluation and a 100-step cool-down still fit in the 300 s left ...
    assert _verdict(schedule, steps=300, seconds=300.0, per_step=1.0) == _verdict(schedule, steps=300)
    # ... at 450 s they no longer do: cool down now, in the 150 s left
    assert _verdict(schedule, steps=500, seconds=450.0, per_step=1.0).cooldown == Cooldown(500, 100, "time ceiling")
    assert _verdict(schedule, steps=500, seconds=560.0, per_step=1.0).cooldown == Cooldown(500, 40, "time ceiling")
    assert _verdict(schedule, steps=500, seconds=600.0, per_step=1.0).stop == "time ceiling"


def test_large_datasets_are_evaluated_several_times_an_epoch_small_ones_once():
    assert _schedule(batches_per_epoch=1800, eval_every_steps=500).evaluation_positions == {450, 900, 1350, 1800}
    assert _schedule(batches_per_epoch=66, eval_every_steps=500).evaluation_positions == {66}
    assert _schedule(batches_per_epoch=66).evaluation_positions == {66}


def test_the_learning_rate_warms_up_stays_and_decays_to_zero_over_the_cool_down():
    schedule = _schedule(warmup_steps=10)
    assert [schedule.lr_factor(s, None) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert schedule.lr_factor(5_000, None) == 1.0  # constant for as long as validation improves
    cooldown = Cooldown(start=1000, steps=200, reason="patience")
    assert [schedule.lr_factor(s, cooldown) for s in (999, 1000, 1100, 1199)] == [1.0, 1.0, 0.5, 0.005]


def test_a_diverging_loss_stops_at_once():
    schedule = _schedule()
    assert schedule.after_evaluation(steps=100, bad_evaluations=0, seconds=1, seconds_per_step=0.1, cooldown=None,
                                     diverged=True).stop == "training loss rising"


def test_the_fixed_schedule_keys_are_refused_with_their_replacement_named():
    with pytest.raises(ConfigError, match=r"train: .*epochs was replaced: .* \(set max_epochs for a ceiling in passes\)"):
        parse_params({"train": {"epochs": 4}})
    with pytest.raises(ConfigError, match="train: .*warmup_ratio was replaced by warmup_steps"):
        parse_params({"train": {"warmup_ratio": 0.1}})
    with pytest.raises(ConfigError, match="compress.distill: .*epochs was replaced"):  # the student's schedule too
        parse_params({"compress": {"distill": {"epochs": 4}}})
    with pytest.raises(ConfigError, match="set at least one ceiling"):
        parse_params({"train": {"max_steps": None, "max_minutes": None}})
    assert TrainConfig(max_steps=None, max_epochs=None, max_minutes=30).max_minutes == 30
