"""The non-finite check: one per optimizer step, on the device, after the gradient sync.

Why after the sync and not on each micro-step's loss: the sync adds every rank's
gradients, so a NaN or Inf from any rank is in every rank's averaged gradients, and
every rank finds the same answer without a collective of its own (GradScaler's
``found_inf``, here with a scale of 1). The check is one fused pass over the gradients
(``torch._amp_foreach_non_finite_check_and_unscale_``, which multiplies them by 1:
bitwise unchanged) into a one-element device tensor; nothing waits for it here.

What reads it, by policy (``--on-nan``):

- ``stop``: the flag is read one step late (``StepCheck.settle`` of the previous step,
  after the next step was queued), so on CUDA the host never waits for it in the loop;
  it is read at once before a checkpoint is written and at the end, so that no
  non-finite parameters are ever saved. The optimizer step of the bad step has then
  been taken: the job stops with exit status 1 either way.
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

    On CUDA the flag is copied to host memory asynchronously as soon as it is queued, with
    an event behind the copy: reading it a step later waits for that event alone, not for
    the work queued since (``.item()`` on the device tensor would wait for all of it)."""
    step: int
    found: torch.Tensor
    loss: torch.Tensor
    done: object = None

    def __post_init__(self):
        if self.found.is_cuda:
            self.found = self.found.to("cpu", non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def bad(self) -> bool:
        """Read the flag (on CUDA: once its copy has landed)."""
        if self.done is not None:
            self.done.synchronize()
        return bool(self.found.item())

    def local_loss(self) -> float:
        return float(self.loss)
