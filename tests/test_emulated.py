"""observe/emulated.py: a device stream on CPU whose events complete late, whose
non-blocking copies may be read only behind a completed event, and which counts the
host's waits; and the Observer on it (the per-step loss is read only once the mark
queued after its copy is complete)."""

import pytest
import torch

from ddp_fnn import observe
from ddp_fnn.observe import Observer, now
from ddp_fnn.observe.emulated import EmulatedStream


def test_events_complete_a_lag_after_they_are_recorded_and_waiting_works_the_queue_off():
    stream = EmulatedStream()
    stream.delay(0.05)                          # a slow kernel: the device falls 50 ms behind
    ev = stream.record()
    assert not ev.query() and stream.syncs == 0
    t0 = now()
    ev.synchronize()
    assert now() - t0 >= 0.05 - 1e-3 and ev.query()
    assert stream.syncs == stream.waits == 1
    assert stream.lag_s < 0.005                 # the device caught up while the host slept
    ev.synchronize()                            # complete: a call, no wait
    assert stream.syncs == 2 and stream.waits == 1


def test_elapsed_time_needs_both_events_complete():
    stream = EmulatedStream()
    a = stream.record()
    stream.delay(0.03)
    b = stream.record()
    with pytest.raises(RuntimeError, match="not completed"):
        a.elapsed_time(b)
    b.synchronize()
    assert a.elapsed_time(b) == pytest.approx(30.0, abs=2.0)


def test_a_non_blocking_copy_is_readable_only_behind_a_completed_event():
    stream = EmulatedStream()
    before = stream.record()
    copy = stream.to_host(torch.tensor(0.25))
    after = stream.record()
    before.synchronize()                        # an event queued before the copy says nothing of it
    with pytest.raises(RuntimeError, match="non-blocking copy read before"):
        float(copy)
    after.synchronize()
    assert float(copy) == 0.25 and copy.item() == 0.25


def test_the_observer_reads_the_loss_only_after_the_mark_behind_its_copy():
    """The step's loss goes to the host without waiting (CUDA: non_blocking into pinned
    memory) and the only event behind that copy is the step's end mark. On this stream a
    read before that mark is seen complete raises; the record must still carry the loss,
    and nothing may have waited before ``finished``."""
    stream = EmulatedStream()
    obs = Observer(observe.Clock(torch.device("cpu"), stream=stream))
    syncs_at_start = stream.syncs                # the clock's anchor
    stream.delay(0.04)                           # the device runs 40 ms behind the host
    obs.begin_step(1)
    for phase in ("data", "forward", "backward", "optimizer"):
        with obs.phase(phase):
            pass
    obs.end_step(samples=4, loss=torch.tensor(0.5, dtype=torch.float64))
    assert stream.syncs == syncs_at_start        # queued, nothing waited for
    (rec,) = obs.finished()
    assert rec.loss == 0.5 and rec.step == 1
    assert rec.start_s - rec.queued_s == pytest.approx(0.04, abs=0.01)   # its work began 40 ms after
    assert [n for n, _, _ in rec.intervals] == ["data", "forward", "backward", "optimizer"]
