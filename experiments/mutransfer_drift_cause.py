"""Which of µP's rules makes its optimal LR rise with width here (µTransfer step 2b, drift)?

    python -m experiments.mutransfer_drift_cause

Each variant of the ablation sweep at width 128 (configs/sweeps/mutransfer_ablation.py) is µP
with one of its rules replaced by SP's, and each replacement is a factor of m = width / 32
(an LR times 1/m, an init times sqrt(m), an attention scale set to this head dim), so at the
base width 32 every such variant is the base model itself. Read as a parametrization, a variant
then has the tuned base's optimum at 32 and its own at 128, and its drift over the two doublings
is the difference. This script computes, for the reference µP and each such variant, that drift
in octaves with a 95% bootstrap interval over seeds (`pretrain.study.transfer.drift`: parabola
vertex through the best seed-averaged grid point and its neighbours, seeds resampled per width),
and a verdict against the goal |drift| < 0.5 octave over the range:

- 'inside': the interval lies in (-0.5, +0.5);
- 'rises' / 'falls': the interval lies above +0.5 / below -0.5;
- 'not shown': otherwise, or from fewer than 2 seeds;
- an optimum at the edge of its grid is only a bound ('at most' at the low edge, 'at least' at
  the high one), and the verdict says so.

Writes docs/mutransfer/ablation_sweep/drift_cause.md.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags

from configs.sweeps import mutransfer_ablation
from experiments import common
from pretrain.study import ablation, transfer

BASE_WIDTH, WIDTH, STEPS = 32, 128, 1000
GOAL_OCTAVES = 0.5
# Variants that are the base model at width 32 (µP with one rule as SP's, or several); the
# decay-off and SP-rebuilt ones are not, and are left out.
AT_BASE_IS_BASE = ('mup', 'embedding_lr_as_sp', 'hidden_init_as_sp', 'vector_lr_as_sp',
                   'attention_as_sp', 'readout_as_sp', 'embedding_lr_and_hidden_init_as_sp',
                   'all_as_sp')


def verdict(result: Mapping[str, Any], large_width: int) -> str:
    """The drift verdict over the range (see the module docstring)."""
    low, high = result['interval']
    optimum = result['optima'][large_width]
    if min(result['seeds'].values()) < transfer.MIN_SEEDS or not (math.isfinite(low) and math.isfinite(high)):
        return 'not shown'
    if optimum['at_edge']:
        bound = 'at most' if optimum['log2_lr'] <= min(result['lrs']) + 1e-9 else 'at least'
        return f'{bound} {result["total"]:+.2f} (optimum at the grid edge)'
    if -GOAL_OCTAVES < low and high < GOAL_OCTAVES:
        return 'inside'
    if low > GOAL_OCTAVES:
        return 'rises'
    if high < -GOAL_OCTAVES:
        return 'falls'
    return 'not shown'


def report(base: transfer.Grid, variants: Mapping[str, transfer.Grid]) -> dict[str, dict[str, Any]]:
    out = {}
    for label, g in variants.items():
        result = transfer.drift({BASE_WIDTH: base, WIDTH: g})
        result['lrs'] = [math.log2(lr) for lr in g.lrs]
        result['verdict'] = verdict(result, WIDTH)
        out[label] = result
    return out


def markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [f'| variant | seeds | optimum at {WIDTH} (log2 LR) | drift {BASE_WIDTH} -> {WIDTH} '
             '(octaves) | 95% interval | verdict (goal: inside +-0.5) |', '|---|---|---|---|---|---|']
    for label, r in results.items():
        o = r['optima'][WIDTH]
        lines.append(f'| {label} | {r["seeds"][WIDTH]} | {o["log2_lr"]:.2f}'
                     f'{" (edge)" if o["at_edge"] else ""} | {r["total"]:+.2f} | '
                     f'{transfer._fmt_interval(r["interval"])} | **{r["verdict"]}** |')
    base = next(iter(results.values()))['optima'][BASE_WIDTH]
    return (f'Base optimum at width {BASE_WIDTH} (tuned base, width sweep): log2 LR '
            f'{base["log2_lr"]:.2f}.\n\n' + '\n'.join(lines) + '\n')


def main(argv: Sequence[str]) -> None:
    del argv
    f = flags.FLAGS   # defined below, only when run as a script (tests import this module)
    base = transfer.grids(transfer.load_rows(f.width_sweep), 'width')[('mup', STEPS, BASE_WIDTH)]
    grids = ablation.grids(transfer.load_rows(f.ablation_sweep), mutransfer_ablation.VARIANTS)
    variants = {label: transfer.every_seed_ran(grids[label]) for label in AT_BASE_IS_BASE if label in grids}
    text = markdown(report(base, variants))
    common.write_report(os.path.join(f.ablation_sweep, 'drift_cause.md'), text)


if __name__ == '__main__':
    flags.DEFINE_string('width_sweep', 'docs/mutransfer/width_sweep', 'The tuned base at width 32.')
    flags.DEFINE_string('ablation_sweep', 'docs/mutransfer/ablation_sweep', 'The variants at 128.')
    app.run(main)
