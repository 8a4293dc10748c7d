"""What the loop does with a step whose metrics['nonfinite'] flag is set: skip it or stop.

`train.nonfinite_policy='stop'` stops at the first such step; 'skip' drops the update and goes
on, but only for `train.max_consecutive_skips` steps in a row: a run whose every step is skipped
is diverged, and going on would report success while training nothing.
"""

from collections.abc import Callable

from pretrain.errors import NonFiniteError
from pretrain.step import describe_nonfinite


class NonFiniteGuard:
    """Counts skipped steps and raises NonFiniteError when the run must stop.

    `check` must be called for every step, in order, with that step's flag (reading it waits
    for the step). `last_checkpoint()` gives (path, step) of the newest saved checkpoint or
    (None, None); it is called only when stopping (after waiting for in-flight saves).
    """

    def __init__(self, policy: str, max_consecutive_skips: int, skipped: int = 0):
        self.policy = policy
        self.limit = max_consecutive_skips
        self.skipped = skipped        # over the whole run (resumed from the checkpoint record)
        self.consecutive = 0          # skipped steps since the last applied one

    def check(self, step: int, nonfinite: int, loss: float, grad_norm: float,
              last_checkpoint: Callable[[], tuple[str | None, int | None]]) -> str | None:
        """None for a good step; a log line for a skipped one; raises NonFiniteError to stop."""
        if not nonfinite:
            self.consecutive = 0
            return None
        what = describe_nonfinite(nonfinite)
        if self.policy == 'skip':
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive < self.limit:
                return (f'step {step}: non-finite {what}; update skipped ({self.skipped} so far, '
                        f'{self.consecutive} in a row)')
            reason = (f'{self.consecutive} consecutive steps ({step - self.consecutive + 1}-'
                      f'{step}) had non-finite values (last: {what}) with '
                      f'train.nonfinite_policy=skip and train.max_consecutive_skips={self.limit}')
        else:
            reason = (f'non-finite {what} at step {step} (loss {loss}, grad norm {grad_norm}) '
                      'with train.nonfinite_policy=stop')
        path, saved = last_checkpoint()
        raise NonFiniteError(
            f'{reason}; nothing after step {step - 1} was saved. Last good checkpoint: '
            + ('none' if saved is None else f'{path} (step {saved})'), step, path)
