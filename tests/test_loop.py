"""trainer/loop.py: periodic actions and the outer loop, driven by a fake clock and a fake learner (no
TensorFlow training)."""

import math

import pytest

from trainer import loop
from trainer import writers
from trainer.faults import TrainingError


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Recorder(writers.MetricWriter):
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def values(self, name):
    return [(step, s[name]) for step, s in self.scalars if name in s]


class FakeLearner:
  """Each step takes `step_secs` on the clock and has loss 1.0 (or NaN from step `nan_at`)."""

  def __init__(self, clock, step_secs=0.5, nan_at=None):
    self.clock, self.step_secs, self.nan_at = clock, step_secs, nan_at
    self.step, self.calls = 0, []
    self.strategy = None  # one process: nothing to wait for before a refusal

  def train(self, iterator, num_steps, epoch):
    del iterator
    self.calls.append((self.step, num_steps, epoch))
    for _ in range(num_steps):
      self.step += 1
      self.clock.now += self.step_secs
      if self.nan_at is not None and self.step >= self.nan_at:
        return {"loss": math.nan, "accuracy": 0.0, "count": 8, "step": self.step}
    return {"loss": 1.0, "accuracy": 0.5, "count": 8 * num_steps, "step": self.step}


class Counting(loop.PeriodicAction):
  def __init__(self, **trigger):
    super().__init__(**trigger)
    self.steps = []

  def act(self, step):
    self.steps.append(step)


def _loop(step):
  return loop.Loop(step, 1, 0.0, {"loss": 0.0, "accuracy": 0.0, "count": 1})


def test_step_triggers_fire_at_multiples_and_listed_steps():
  action = Counting(every_steps=(4, 6), on_steps=(5,), clock=FakeClock())
  for step in range(1, 13):
    action(_loop(step))
  assert action.steps == [4, 5, 6, 8, 12]
  assert [action.next_step(s) for s in (0, 4, 5, 6, 11)] == [4, 5, 6, 8, 12]
  assert Counting(every_steps=0).next_step(3) is None  # 0: off


def test_time_trigger_uses_the_injected_clock():
  clock = FakeClock()
  action = Counting(every_secs=10.0, clock=clock)
  for step, now in enumerate([3.0, 9.9, 10.0, 12.0, 19.9, 20.5], 1):
    clock.now = now
    action(_loop(step))
  assert action.steps == [3, 6]  # 10 s after it was made, then 10 s after it last ran
  assert action.next_step(6) is None  # a time trigger never bounds a loop


def test_loop_length_stops_at_the_nearest_boundary():
  actions = [Counting(every_steps=7), Counting(on_steps=(3, 11))]
  assert loop.loop_length(0, 100, steps_per_epoch=10, steps_per_loop=5, actions=actions) == 3
  assert loop.loop_length(3, 100, 10, 5, actions) == 2
  assert loop.loop_length(5, 100, 10, 5, actions) == 2  # the action at 7
  assert loop.loop_length(7, 100, 10, 0, actions) == 3  # the epoch's end
  assert loop.loop_length(98, 100, 10, 50, actions) == 2  # the end


def test_report_progress_counts_train_loop_time_only():
  """A checkpoint between loops that takes 1,000 s of wall time does not count in images/s."""
  clock = FakeClock()
  recorder = Recorder()
  report = loop.ReportProgress(recorder, 32, lambda: {"learning_rate": 0.1}, every_steps=4, clock=clock)
  slow_save = loop.Checkpoint(lambda step: setattr(clock, "now", clock.now + 1000.0), every_steps=1, clock=clock)
  learner = FakeLearner(clock, step_secs=0.5)
  stopped = loop.train_loops(learner, None, [report, slow_save], start_step=0, total_steps=8, steps_per_epoch=8,
                     steps_per_loop=1, stop_requested=lambda: False, last_checkpoint=lambda: None, clock=clock)
  assert not stopped
  assert recorder.values("train/images_per_sec") == [(4, 64.0), (8, 64.0)]  # 32 images / 0.5 s
  assert recorder.values("train/loss") == [(4, 1.0), (8, 1.0)]
  assert recorder.values("train/learning_rate") == [(4, 0.1), (8, 0.1)]
  assert report.last["accuracy"] == 0.5


def test_epoch_timer_skips_an_epoch_resumed_in_the_middle():
  clock = FakeClock()
  recorder = Recorder()
  learner = FakeLearner(clock, step_secs=1.0)
  learner.step = 3  # resumed at step 3 of a 4-step epoch
  timer = loop.EpochTimer(recorder, steps_per_epoch=4, clock=clock)
  loop.train_loops(learner, None, [timer], start_step=3, total_steps=12, steps_per_epoch=4, steps_per_loop=2,
           stop_requested=lambda: False, last_checkpoint=lambda: None, clock=clock)
  assert recorder.values("train/epoch_seconds") == [(8, 4.0), (12, 4.0)]
  assert learner.calls == [(3, 1, 0), (4, 2, 1), (6, 2, 1), (8, 2, 2), (10, 2, 2)]


def test_epoch_seconds_leave_out_the_validation_after_the_timer():
  """The trainer lists the timer before validation: an epoch's seconds are its train loops (and what runs
  inside the epoch), not its end-of-epoch evaluation, nor the previous one's."""
  clock = FakeClock()
  recorder = Recorder()
  slow_validation = Counting(every_steps=4, clock=clock)
  slow_validation.run = lambda step: setattr(clock, "now", clock.now + 100.0)
  loop.train_loops(FakeLearner(clock, step_secs=1.0), None, [loop.EpochTimer(recorder, 4, clock=clock), slow_validation],
           start_step=0, total_steps=8, steps_per_epoch=4, steps_per_loop=2, stop_requested=lambda: False,
           last_checkpoint=lambda: None, clock=clock)
  assert recorder.values("train/epoch_seconds") == [(4, 4.0), (8, 4.0)]


def test_stop_request_ends_the_loop_after_the_actions():
  clock = FakeClock()
  action = Counting(every_steps=1, clock=clock)
  asked = []
  stopped = loop.train_loops(FakeLearner(clock), None, [action], start_step=0, total_steps=10, steps_per_epoch=5,
                     steps_per_loop=2, stop_requested=lambda: asked.append(1) or len(asked) == 2,
                     last_checkpoint=lambda: None, clock=clock)
  assert stopped and action.steps == [1, 2] and len(asked) == 2


def test_non_finite_loss_raises_before_any_action_runs():
  clock = FakeClock()
  save = Counting(every_steps=2, clock=clock)
  with pytest.raises(TrainingError, match=r"^loss is nan at step 3; stopped without saving\. The last good "
                     r"checkpoint is /w/checkpoints/ckpt-2$"):
    loop.train_loops(FakeLearner(clock, nan_at=3), None, [save], start_step=0, total_steps=10, steps_per_epoch=10,
             steps_per_loop=4, stop_requested=lambda: False, last_checkpoint=lambda: "/w/checkpoints/ckpt-2",
             clock=clock)
  assert save.steps == [2]


def test_every_action_is_closed_however_the_loop_ends():
  closed = []

  class Closing(Counting):
    def close(self):
      closed.append(True)

  clock = FakeClock()
  with pytest.raises(TrainingError):
    loop.train_loops(FakeLearner(clock, nan_at=1), None, [Closing(every_steps=1)], start_step=0, total_steps=4,
             steps_per_epoch=4, steps_per_loop=1, stop_requested=lambda: False, last_checkpoint=lambda: None,
             clock=clock)
  assert closed == [True]


def test_timeline_and_action_timing():
  """The first step's end is the first loop's end less its other steps at the later loops' rate (a first
  call that traces for 10 s); each action counts its runs and their seconds."""
  clock = FakeClock()

  class Tracing(FakeLearner):
    def train(self, iterator, num_steps, epoch):
      if not self.calls:
        self.clock.now += 10.0
      return super().train(iterator, num_steps, epoch)

  timeline = loop.Timeline(clock=clock)
  save = loop.Checkpoint(lambda step: setattr(clock, "now", clock.now + 3.0), every_steps=4, clock=clock)
  loop.train_loops(Tracing(clock, step_secs=0.5), None, [timeline, save], start_step=0, total_steps=12, steps_per_epoch=12,
           steps_per_loop=4, stop_requested=lambda: False, last_checkpoint=lambda: None, clock=clock)
  assert (timeline.loops, timeline.first_steps, timeline.first_seconds) == (3, 4, 12.0)
  assert timeline.first_step_end() == 10.5  # 10 s of tracing and one 0.5 s step
  assert timeline.train_seconds == 16.0 and timeline.last_end == 16.0 + 2 * 3.0
  assert save.timing() == {"checkpoint": {"runs": 3, "secs": 9.0}} and timeline.timing() == {}


def test_the_first_steps_end_is_never_put_before_its_loop_began():
  """Later loops slower than the first (the machine got busier: seen as start_to_first_step_secs = -14.3 in
  a deep.py run): the first loop's other steps are taken out at most at its own mean rate."""
  clock = FakeClock()

  class Slowing(FakeLearner):
    def train(self, iterator, num_steps, epoch):
      self.step_secs = 0.5 if not self.calls else 5.0
      return super().train(iterator, num_steps, epoch)

  timeline = loop.Timeline(clock=clock)
  loop.train_loops(Slowing(clock), None, [timeline], start_step=0, total_steps=12, steps_per_epoch=12,
                   steps_per_loop=4, stop_requested=lambda: False, last_checkpoint=lambda: None, clock=clock)
  assert (timeline.first_end, timeline.first_seconds) == (2.0, 2.0)
  assert timeline.first_step_end() == 0.5  # not 2.0 - 3 * 5.0 = -13.0
