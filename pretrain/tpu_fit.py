"""Fit advisor: which remat policy and micro-batch count make a config fit a TPU topology, and
which of those is fastest by the roofline estimate.

    python -m pretrain.tpu_fit --config=configs/llama_1b.py --topology=v5e:4x4 \
        [--slices=1] [--remat=none,dots,full] [--grad_accum=1,2,4,8] [--all] [--out=fit.json]

Each candidate is the trainer's real train step compiled ahead of time for the topology by the
TPU compiler (pretrain/tpu.py; needs `pip install -e '.[tpu]'`). For each remat policy, from the
cheapest in compute, the micro-batch counts are tried from the fewest up and the first that fits
ends that policy's search (more micro-batches only add time); a policy with more recompute is
tried only with fewer micro-batches than a cheaper policy already fits with (with as many it
only adds work); --all compiles every combination.
The estimate is a roofline (compute vs HBM traffic, no collectives): it ranks candidates, it does
not measure them. Nothing is written except --out.
"""

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from model_zoo import FAMILIES   # this entry point hands the family registry to the setup
from pretrain import cli_errors
from pretrain import config as config_lib
from pretrain import dry_run, logs, tpu
from pretrain import setup as setup_lib
from pretrain.errors import ConfigError, DoesNotFitError
from pretrain.registry import Registry

REMAT_ORDER = ('none', 'dots', 'full')   # cheapest in compute first

@dataclasses.dataclass
class Candidate:
    remat: str
    grad_accum: int
    result: dict[str, Any] | None = None   # dry_run.report's dict (with 'tpu'), when it compiled
    error: str = ''                         # why it did not compile (config or compiler)

    @property
    def fits(self) -> bool:
        return self.result is not None and self.result['tpu']['fits']

    def row(self) -> dict[str, Any]:
        return {'remat': self.remat, 'grad_accum': self.grad_accum, 'fits': self.fits,
                'error': self.error, **({'dry_run': self.result} if self.result else {})}


def _compile(config: ml_collections.ConfigDict, devices: list[jax.Device], remat: str,
             grad_accum: int, families: Registry) -> Candidate:
    candidate = Candidate(remat, grad_accum)
    try:
        cfg = config_lib.with_overrides(config, {'model.remat': remat,
                                                 'train.grad_accum_steps': grad_accum})
        setup = setup_lib.build(cfg, devices, families=families, check_data=False)
        candidate.result = dry_run.report(setup, quiet=True)
    except ConfigError as e:
        candidate.error = f'config: {e}'
    except DoesNotFitError as e:   # the TPU compiler refused a program that cannot fit in HBM
        candidate.error = f'compiler: {e.compiler_message[:300]}'
    except Exception as e:   # any other compiler refusal is an answer for this candidate too
        candidate.error = f'compiler: {str(e).splitlines()[0][:300]}'
    return candidate


def advise(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
           remats: Sequence[str] = REMAT_ORDER, grad_accums: Sequence[int] = (1, 2, 4, 8),
           exhaustive: bool = False, families: Registry = FAMILIES,
           say=print) -> dict[str, Any]:
    """Compiles the candidates for `topology`; returns {'candidates': [...], 'best': row|None}."""
    devices = tpu.devices(topology, num_slices)
    for remat in remats:   # names checked before the first (slow) compile
        if remat not in REMAT_ORDER:
            raise ConfigError(f'--remat: {remat!r} is not one of {list(REMAT_ORDER)}')
    candidates = []
    fewest = None   # the fewest micro-batches with which a cheaper policy fits
    for remat in sorted(remats, key=REMAT_ORDER.index):
        for grad_accum in sorted(grad_accums):
            if not exhaustive and fewest is not None and grad_accum >= fewest:
                break   # more recompute at no fewer micro-batches: not faster
            candidate = _compile(config, devices, remat, grad_accum, families)
            candidates.append(candidate)
            say(_line(candidate))
            if candidate.fits and not exhaustive:
                fewest = grad_accum if fewest is None else min(fewest, grad_accum)
                break
    fitting = [c for c in candidates if c.fits]
    best = min(fitting, key=lambda c: c.result['tpu']['step_s'], default=None)
    return {'topology': topology, 'slices': num_slices, 'devices': len(devices),
            'candidates': [c.row() for c in candidates], 'best': best.row() if best else None}


def nothing_fits(candidates: list[dict[str, Any]]) -> str:
    """Why no candidate fits: the smallest temporaries the compiler asked for, and how many
    micro-batch counts the config refused (a micro-batch smaller than the data-parallel size)."""
    asked = []
    for c in candidates:
        match = re.search(r'temporaries \(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G\)',
                          c.get('error', ''))
        if match:
            asked.append((float(match[1]), float(match[2]), c['remat'], c['grad_accum']))
    refused = sum(c.get('error', '').startswith('config:') for c in candidates)
    text = 'nothing tried fits'
    if asked:
        need, available, remat, accum = min(asked)
        text += (f': the least the compiler asked for is {need:.2f}G of temporaries (remat '
                 f'{remat}, accum {accum}) against {available:.2f}G free')
    if refused:
        text += (f'; {refused} micro-batch counts refused by the config (a micro-batch must '
                 'hold a sequence per data-parallel chip)')
    return text


def _line(c: Candidate) -> str:
    head = f'  remat={c.remat:<5} grad_accum={c.grad_accum:<2} '
    if c.result is None:
        return head + c.error
    t = c.result['tpu']
    total = c.result['total_bytes'] / tpu.GIB
    return (head + f'{total:7.2f} GiB of {t["hbm_bytes"] / tpu.GIB:.0f} '
            f'{"fits" if t["fits"] else "over"}; estimate {t["step_s"] * 1e3:8.1f} ms/step, '
            f'MFU {100 * t["mfu"]:5.1f}% ({t["bound"]}-bound)')


def summary(advice: dict[str, Any]) -> str:
    best = advice['best']
    if best is None:
        return (f'nothing tried fits {advice["topology"]}: more chips, a smaller batch per chip, '
                'or more micro-batches')
    t = best['dry_run']['tpu']
    return (f'best on {advice["topology"]}: remat={best["remat"]}, '
            f'train.grad_accum_steps={best["grad_accum"]} (estimate {t["step_s"] * 1e3:.1f} ms/step, '
            f'MFU {100 * t["mfu"]:.1f}%, {t["headroom_bytes"] / tpu.GIB:.2f} GiB HBM to spare)')


def _define_flags() -> None:
    """Defined only when run as a program: importing the advisor (experiments/tpu_fit.py does)
    must not claim flag names such as --config and --out."""
    config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
    flags.DEFINE_string('topology', None, 'TPU topology, e.g. v5e:4x4, v5p:4x4x4.')
    flags.DEFINE_integer('slices', 1, 'Slices joined over DCN.')
    flags.DEFINE_list('remat', list(REMAT_ORDER), 'Remat policies to try.')
    flags.DEFINE_list('grad_accum', ['1', '2', '4', '8'], 'Micro-batch counts to try.')
    flags.DEFINE_bool('all', False, 'Compile every combination instead of stopping each policy '
                      'at its first fit.')
    flags.DEFINE_string('out', '', 'Write the candidates and the choice as JSON here.')


def main(argv) -> None:
    logs.quiet_libraries()
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f'usage error: unexpected arguments {argv[1:]}')
    if FLAGS.config is None or not FLAGS.topology:
        raise SystemExit('usage error: --config=FILE and --topology=NAME are required, e.g. '
                         '--config=configs/llama_1b.py --topology=v5e:4x4')
    try:
        grad_accums = [int(n) for n in FLAGS.grad_accum]
    except ValueError:
        raise SystemExit(f'usage error: --grad_accum={",".join(FLAGS.grad_accum)} must be '
                         'integers') from None
    if FLAGS.out:   # a folder that cannot take the file: say so before compiling for minutes
        out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
        if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and os.access(out_dir, os.W_OK)):
            raise SystemExit(f'usage error: --out={FLAGS.out}: {out_dir} is not a writable folder')
    jax.config.update('jax_platforms', 'cpu')   # the topology's devices are abstract
    try:
        advice = advise(FLAGS.config, FLAGS.topology, FLAGS.slices, FLAGS.remat, grad_accums,
                        exhaustive=FLAGS.all)
    except ConfigError as e:
        raise SystemExit(f'config error: {e}') from None
    print(summary(advice), flush=True)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, 'w') as f:
            json.dump(advice, f, indent=1)


if __name__ == '__main__':
    _define_flags()
    app.run(main, flags_parser=cli_errors.parse_flags)
