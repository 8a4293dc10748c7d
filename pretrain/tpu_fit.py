"""Fit advisor: which remat policy and micro-batch count make a config fit a TPU topology, and
which of those is fastest by the roofline estimate.

    python -m pretrain.tpu_fit --config=configs/llama_1b.py --topology=v5e:4x4 \
        [--slices=1] [--remat=none,dots,full] [--grad_accum=1,2,4,8] [--tensor=4,8] [--all]
        [--out=fit.json]

Each candidate is the trainer's real train step compiled ahead of time for the topology by the
TPU compiler (pretrain/tpu.py; needs `pip install -e '.[tpu]'`). For each remat policy, from the
cheapest in compute, the micro-batch counts are tried from the fewest up and the first that fits
ends that policy's search (more micro-batches only add time); a policy with more recompute is
tried only with fewer micro-batches than a cheaper policy already fits with (with as many it
only adds work). A count whose temporaries cannot fit, judged from a refusal with fewer
micro-batches (only the activations shrink with the micro-batch), is not compiled: an 8B
model's refusals take minutes each. --all compiles every combination. The config's own mesh is
searched first; only if nothing fits with it, each --tensor size is tried in turn
(mesh.ici.tensor set, the config's -1 axis taking the rest), stopping at the first layout with
a fit: the roofline leaves out the collectives that set layouts apart, so it cannot rank them,
only say which fit.
The estimate is a roofline (compute vs HBM traffic, no collectives): it ranks candidates, it does
not measure them. Nothing is written except --out.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
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
    tensor: int | None = None               # mesh.ici.tensor set for this layout; None: the config's
    result: dict[str, Any] | None = None   # dry_run.report's dict (with 'tpu'), when it compiled
    error: str = ''                         # why it did not compile (config or compiler)

    @property
    def fits(self) -> bool:
        return self.result is not None and self.result['tpu']['fits']

    def row(self) -> dict[str, Any]:
        return {'remat': self.remat, 'grad_accum': self.grad_accum, 'tensor': self.tensor,
                'fits': self.fits,
                'error': self.error, **({'dry_run': self.result} if self.result else {})}


def _compile(config: ml_collections.ConfigDict, devices: list[jax.Device], remat: str,
             grad_accum: int, tensor: int | None, families: Registry) -> Candidate:
    candidate = Candidate(remat, grad_accum, tensor)
    overrides = {'model.remat': remat, 'train.grad_accum_steps': grad_accum}
    if tensor is not None:
        overrides['mesh.ici.tensor'] = tensor
    try:
        cfg = config_lib.with_overrides(config, overrides)
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
           layouts: Sequence[int | None] = (None,), exhaustive: bool = False,
           families: Registry = FAMILIES, say=print, done: Sequence[dict[str, Any]] = (),
           record: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Compiles the candidates for `topology`; returns {'candidates': [...], 'best': row|None}.

    `layouts` are tensor-parallel sizes (None: the config's mesh as it is), tried in order until
    one has a fit (all of them with `exhaustive`). `done` holds the rows of an interrupted search,
    reused instead of compiled again; `record` gets every row so far after each candidate (an
    8B-parameter compile takes minutes: a caller can save them as they come), and before each
    compile the rows with that candidate marked `died:`, which its result replaces."""
    reuse = {(row.get('tensor'), row['remat'], row['grad_accum']): row for row in done
             if not row.get('error', '').startswith(SKIPPED)}   # skips are decided afresh
    # A `died:` row in `done` was saved just before its compile and never replaced: the compile
    # ended the process (a large model's TPU compile can take more host memory than the machine
    # has, and the out-of-memory killer leaves no exception to catch). Compiling it again would
    # only repeat that, so it is reused as its candidate's answer until removed from `done`.
    devices = tpu.devices(topology, num_slices)
    for remat in remats:   # names checked before the first (slow) compile
        if remat not in REMAT_ORDER:
            raise ConfigError(f'--remat: {remat!r} is not one of {list(REMAT_ORDER)}')
    for tensor in layouts:
        if tensor is not None and (tensor < 1 or len(devices) % tensor):
            raise ConfigError(f'--tensor: {tensor} must be a positive divisor of the '
                              f'{len(devices)} chips of {topology}')
    candidates = []
    for tensor in layouts:
        fewest = None   # the fewest micro-batches with which a cheaper policy fits
        for remat in sorted(remats, key=REMAT_ORDER.index):
            refused = None   # (temporaries asked for, free, micro-batches) of the last refusal
            for grad_accum in sorted(grad_accums):
                if not exhaustive and fewest is not None and grad_accum >= fewest:
                    break   # more recompute at no fewer micro-batches: not faster
                row = reuse.get((tensor, remat, grad_accum))
                too_big = '' if exhaustive else _cannot_fit(refused, grad_accum)
                if row is None and too_big:
                    candidate = Candidate(remat, grad_accum, tensor, error=too_big)
                elif row is None:
                    if record is not None:   # stays if the compile kills the process (below)
                        record([c.row() for c in candidates]
                               + [Candidate(remat, grad_accum, tensor, error=DIED_TEXT).row()])
                    try:
                        candidate = _compile(config, devices, remat, grad_accum, tensor, families)
                    except KeyboardInterrupt:   # an interrupt is not a verdict on the candidate
                        if record is not None:
                            record([c.row() for c in candidates])
                        raise
                else:
                    candidate = Candidate(remat, grad_accum, tensor, row.get('dry_run'),
                                          row.get('error', ''))
                candidates.append(candidate)
                refused = _asked(candidate.error, grad_accum) or refused
                say(_line(candidate))
                if record is not None:
                    record([c.row() for c in candidates])
                if candidate.fits and not exhaustive:
                    fewest = grad_accum if fewest is None else min(fewest, grad_accum)
                    break
        if fewest is not None:
            break   # the first layout that fits: the roofline cannot rank layouts
    fitting = [c for c in candidates if c.fits]
    best = min(fitting, key=lambda c: c.result['tpu']['step_s'], default=None)
    return {'topology': topology, 'slices': num_slices, 'devices': len(devices),
            'candidates': [c.row() for c in candidates], 'best': best.row() if best else None}


_OOM = re.compile(r'temporaries \(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G\)')
SKIPPED = 'skipped:'   # the prefix of a candidate left uncompiled by _cannot_fit
DIED = 'died:'         # the prefix of a candidate whose compile ended the process
DIED_TEXT = (f'{DIED} the process ended during this compile (the host\'s out-of-memory killer, '
             'or a kill) and it is not compiled again on resume; remove this row from the saved '
             'rows to retry')
BOUND_SLACK = 0.5      # _cannot_fit's margin under the measured scaling of temporaries


def _asked(error: str, grad_accum: int) -> tuple[float, float, int] | None:
    """(temporaries asked for, HBM free, micro-batches) from a compiler's out-of-memory refusal."""
    match = _OOM.search(error)
    return (float(match[1]), float(match[2]), grad_accum) if match else None


def _cannot_fit(refused: tuple[float, float, int] | None, grad_accum: int) -> str:
    """Why `grad_accum` micro-batches cannot fit, given a refusal with fewer ('' if they may).

    Temporaries are a part that does not shrink with the micro-batch (gradients, optimizer
    update) plus activations that shrink in proportion: T(a) = F + A / a with F, A >= 0, so
    T(a) >= T(a0) * a0 / a for a >= a0. The compiler's scheduling bends that model: over the
    20 pairs of successive compiles in docs/tpu_fit/, T(a) a / (T(a0) a0) ran from 0.70 to 1.8,
    so the bound is halved (BOUND_SLACK) before it rules a count out. Where even that exceeds
    the free HBM, the compile (minutes for a large model) can only be refused, and is left out."""
    if refused is None:
        return ''
    asked, free, fewer = refused
    bound = BOUND_SLACK * asked * fewer / grad_accum
    if bound <= free:
        return ''
    return (f'{SKIPPED} needs more than {bound:.2f}G of temporaries against {free:.2f}G free '
            f'(the compiler asked for {asked:.2f}G with {fewer} micro-batches; only activations '
            f'shrink with more; bound halved for the compiler\'s scheduling)')


def layouts_left(saved: dict[str, Any], layouts: Sequence[int | None]) -> list[int | None]:
    """The layouts a saved advice has still to try: none once it has a fit or a config error
    (a search goes on to the next layout only while nothing fits)."""
    if saved.get('best') is not None or saved.get('error'):
        return []
    tried = {c.get('tensor') for c in saved['candidates']}   # saved before layouts: None
    return [t for t in layouts if t not in tried]


def nothing_fits(candidates: list[dict[str, Any]]) -> str:
    """Why no candidate fits: the smallest temporaries the compiler asked for, and how many
    micro-batch counts the config refused (a micro-batch smaller than the data-parallel size)."""
    asked = []
    for c in candidates:
        match = _OOM.search(c.get('error', ''))
        if match:
            layout = '' if c.get('tensor') is None else f'tensor {c["tensor"]}, '
            asked.append((float(match[1]), float(match[2]), layout, c['remat'], c['grad_accum']))
    refused = sum(c.get('error', '').startswith('config:') for c in candidates)
    text = 'nothing tried fits'
    if asked:
        need, available, layout, remat, accum = min(asked)
        text += (f': the least the compiler asked for is {need:.2f}G of temporaries ({layout}remat '
                 f'{remat}, accum {accum}) against {available:.2f}G free')
    if refused:
        text += (f'; {refused} micro-batch counts refused by the config (a micro-batch must '
                 'hold a sequence per data-parallel chip)')
    return text


def _line(c: Candidate) -> str:
    head = (f'  {"" if c.tensor is None else f"tensor={c.tensor} "}remat={c.remat:<5} '
            f'grad_accum={c.grad_accum:<2} ')
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
                'more micro-batches or a tensor-parallel layout (--tensor)')
    t = best['dry_run']['tpu']
    layout = '' if best.get('tensor') is None else f'mesh.ici.tensor={best["tensor"]}, '
    return (f'best on {advice["topology"]}: {layout}remat={best["remat"]}, '
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
    flags.DEFINE_list('tensor', [], 'Tensor-parallel sizes to try, in order, if nothing fits with '
                      "the config's mesh.")
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
        tensors = [int(n) for n in FLAGS.tensor]
    except ValueError:
        raise SystemExit(f'usage error: --grad_accum={",".join(FLAGS.grad_accum)} and '
                         f'--tensor={",".join(FLAGS.tensor)} must be integers') from None
    if FLAGS.out:   # a folder that cannot take the file: say so before compiling for minutes
        out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
        if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and os.access(out_dir, os.W_OK)):
            raise SystemExit(f'usage error: --out={FLAGS.out}: {out_dir} is not a writable folder')
    jax.config.update('jax_platforms', 'cpu')   # the topology's devices are abstract
    try:
        advice = advise(FLAGS.config, FLAGS.topology, FLAGS.slices, FLAGS.remat, grad_accums,
                        layouts=[None, *tensors], exhaustive=FLAGS.all)
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
