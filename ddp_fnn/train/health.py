"""The non-finite check: one per optimizer step, on the device, after the gradient sync.

Why after the sync and not on each micro-step's loss: the sync adds every rank's
gradients, so a NaN or Inf from any rank is in every rank's averaged gradients, and
every rank finds the same answer without a collective of its own (GradScaler's
``found_inf``, here with a scale of 1). The check is one fused pass over the gradients
(``torch._amp_foreach_non_finite_check_and_unscale_``, which multiplies them by 1:
bitwise unchanged) into a one-element device tensor; nothing waits for it here.

What reads it, by policy (``--on-nan``):

- ``stop``: the flag is read where reading it costs no wait. On CPU that is at once. On
  CUDA it is read at the next log step or checkpoint step and at the end (loop.settle),
  so the host never waits for it between them and runs ahead of its device as under
  plain DDP; every rank reads it at the same step, so every rank stops there. No
  non-finite parameters are ever logged or saved; the optimizer steps taken after the bad
  one (on CUDA up to the log interval's rest) have been taken: the job stops with exit
  status 1 either way.
- ``skip``: the flag is read before the optimizer step, one host read per step (as
  ``GradScaler.step`` does), and a bad step is skipped on every rank alike. Only then
  do the ranks compare their own losses (one small all-reduce, on bad steps alone) to
  say whose loss it was.

A gradient can overflow with every loss finite; the messages say which it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def nonfinite_gradients(module: torch.nn.Module) -> torch.Tensor:
    """A one-element float tensor on the gradients' device: 1.0 if any gradient holds a
    NaN or Inf, else 0.0. Queued, not read."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    found = torch.zeros(1, device=device)
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=device))
    return found


@dataclass
class StepCheck:
    """One step's queued check, and this rank's loss over the step (a tensor, also not read).

    ``queue`` starts the flag's copy to host memory at once and takes a mark behind it:
    reading the flag later waits for that mark alone, not for the work queued since
    (``.item()`` on the device tensor would wait for all of it)."""
    step: int
    found: object                 # the flag on its way to host memory (observe.Clock.to_host)
    loss: torch.Tensor
    done: object = None           # a mark after the copy (None: nothing to wait for, CPU)

    @classmethod
    def queue(cls, step: int, found: torch.Tensor, loss: torch.Tensor, clock) -> StepCheck:
        return cls(step, clock.to_host(found), loss, clock.mark() if clock.deferred else None)

    def bad(self) -> bool:
        """Read the flag (on CUDA: once its copy has landed)."""
        if self.done is not None:
            self.done.synchronize()
        return bool(self.found.item())

    def local_loss(self) -> float:
        return float(self.loss)
