"""Throughput of the real train step on this machine, written to docs/benchmarks.md.

    python -m benchmarks.train_throughput [--sizes=small,medium,large] [--steps=4] [--devices=2] \
        [--out=docs/benchmarks.md]

Builds every configuration with the trainer's own `pretrain.setup.build` (config validation,
parametrization, optimizer chain with its applied-rate metrics, mesh, shardings, donation), feeds
a synthetic random-token batch with the setup's batch sharding, and times all configurations
round-robin. MFU is
against the measured float32 matmul peak on CPU, or the device-kind table on an accelerator.
For the largest size it also breaks down where the step time goes (phases, standalone matmuls,
XLA cost analysis, a jax.profiler trace attributed to source lines).
"""

import collections
import dataclasses
import datetime
import gzip
import importlib.metadata
import json
import linecache
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from absl import app, flags

import model_zoo
from pretrain import peak_flops as peak_flops_lib
from pretrain import setup as setup_lib

# Model sizes: the shapes of configs/lm_tiny.py scaled up, seq 256 everywhere. 'medium' is the
# reference point of the stack notes (~1.2 s/step on a quiet 2-core CPU); 'large' is the widest
# model whose step, with its four variants, keeps the whole run near 10 minutes on a loaded one.
SIZES: dict[str, dict[str, Any]] = {
    'small': dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, seq_len=256, batch=16),
    'medium': dict(d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=768, seq_len=256, batch=16),
    'large': dict(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1536, seq_len=256, batch=8),
}


_SIZES = flags.DEFINE_list('sizes', ['small', 'medium', 'large'], f'Sizes among {list(SIZES)}.')
_STEPS = flags.DEFINE_integer('steps', 4, 'Timed steps per configuration.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed steps after compiling.', lower_bound=0)
_DEVICES = flags.DEFINE_integer('devices', 2, 'Simulated CPU devices; >1 adds a data-parallel '
                                'row for the largest size.', lower_bound=1)
_ANALYSE = flags.DEFINE_bool('analyse', True, 'Break down where the time of the largest size goes.')
_PROFILE = flags.DEFINE_bool('profile', True, 'Include a jax.profiler trace in the breakdown.')
_OUT = flags.DEFINE_string('out', 'docs/benchmarks.md', 'Markdown report to write.')
flags.register_validator('sizes', lambda sizes: all(s in SIZES for s in sizes),
                         f'--sizes must name sizes among {list(SIZES)}')


def _force_host_devices(n: int) -> None:
    # XLA reads this when the CPU backend starts (first device query), not at `import jax`.
    flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


# --- Configs --------------------------------------------------------------------------------

def make_config(size: str, *, compute_dtype: str = 'float32', remat: str = 'none') -> ml_collections.ConfigDict:
    s = SIZES[size]
    c = model_zoo.base_config()
    c.model.update(d_model=s['d_model'], n_layers=s['n_layers'], n_heads=s['n_heads'],
                   n_kv_heads=s['n_kv_heads'], d_ff=s['d_ff'], compute_dtype=compute_dtype,
                   remat=remat)
    c.data.seq_len = s['seq_len']
    c.train.update(global_batch_size=s['batch'], eval_every=0)
    c.metrics.tensorboard = False
    return c


def synthetic_batch(setup: setup_lib.Setup) -> dict[str, jax.Array]:
    """Random tokens with the setup's batch sharding."""
    cfg = setup.cfg
    rows, length = cfg.train.global_batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (rows, length + 1), np.int32)
    return setup.global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]})


def _xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
        cost = cost[0] if cost else None
    return float(cost['flops']) if cost and 'flops' in cost else None


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall seconds and process CPU seconds per call of each fn, timed in rounds (one call of
    each per round).

    Other jobs share the cores; round-robin makes every fn see the same load pattern, so ratios
    between them are fair even when absolute times drift. CPU seconds (all threads) count the
    work done and grow much less than wall time when the process waits for a core.
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)
    return wall, cpu


# --- Step throughput -----------------------------------------------------------------------

class Case:
    """One configuration: its compiled train step, advancing its own (donated) state."""

    def __init__(self, key: str, label: str, config: ml_collections.ConfigDict,
                 devices: list[jax.Device]):
        self.key, self.label, self.devices = key, label, devices
        self.setup = setup_lib.build(config, devices, families=model_zoo.FAMILIES)
        self.batch = synthetic_batch(self.setup)
        with self.setup.activate():
            self.state = self.setup.init_state()
            start = time.perf_counter()
            self.compiled = self.setup.train_step.lower(self.state, self.batch).compile()
            self.compile_s = time.perf_counter() - start
        self.metrics: dict[str, jax.Array] = {}
        print(f'{label:<30} compiled in {self.compile_s:5.1f}s', flush=True)

    def step(self) -> Any:
        self.state, metrics = self.compiled(self.state, self.batch)
        self.metrics = metrics
        return self.state, metrics


@dataclasses.dataclass
class Row:
    label: str
    params: int
    batch: int
    seq_len: int
    devices: int
    dtype: str
    remat: str
    compile_s: float
    step_times: list[float]
    cpu_times: list[float]
    flops_per_step: float       # the family's formula
    xla_flops: float | None     # compiled cost analysis (of one device's program)
    loss: float

    @property
    def step_s(self) -> float:
        # Best of the interleaved steps: the least disturbed by other jobs, and comparable
        # with the peak, which is also a best-of measurement.
        return min(self.step_times)

    def cpu_mfu(self, ref_flops_per_cpu_s: float) -> float:
        """FLOPs per CPU second over a square matmul's: MFU that waiting for a core barely
        changes (it reads a little high when the step leaves cores idle, as then the wall time
        is what grows)."""
        return self.flops_per_step / min(self.cpu_times) / ref_flops_per_cpu_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / self.step_s

    @property
    def flops_per_s(self) -> float:
        return self.flops_per_step / self.step_s


def square_matmul(n: int = 2048) -> tuple[Callable[[], Any], float]:
    """A jitted n×n float32 matmul on the first device, and its FLOPs."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, a), 2.0 * n ** 3


def time_cases(cases: list[Case], steps: int, warmup: int) -> tuple[dict[str, Row], dict[str, float]]:
    """Rows of the table, and the best FLOP per wall second and per CPU second of a square
    matmul timed in the same rounds."""
    ref, ref_flops = square_matmul()
    times, cpu = interleaved({'_ref': ref, **{c.key: c.step for c in cases}}, steps, warmup)
    rows = {}
    for c in cases:
        cfg = c.setup.cfg
        rows[c.key] = r = Row(
            label=c.label, params=c.setup.param_count, batch=cfg.train.global_batch_size,
            seq_len=cfg.data.seq_len, devices=len(c.devices), dtype=cfg.model.compute_dtype,
            remat=cfg.model.remat, compile_s=c.compile_s, step_times=times[c.key], cpu_times=cpu[c.key],
            flops_per_step=c.setup.flops_per_step,
            xla_flops=_xla_flops(c.compiled), loss=float(c.metrics['loss']))
        print(f'{r.label:<30} step {r.step_s:6.3f}s (median {statistics.median(r.step_times):.3f})  '
              f'{r.tokens_per_s:8,.0f} tok/s  {r.flops_per_s / 1e9:6.1f} GFLOP/s  loss {r.loss:.3f}',
              flush=True)
    return rows, {'wall': ref_flops / min(times['_ref']), 'cpu': ref_flops / min(cpu['_ref'])}


# --- Where the time goes -------------------------------------------------------------------

def _dense_fwd_bwd(x, w, dy):
    """The three GEMMs of one dense layer in training: y = xW, dx = dy W^T, dW = x^T dy."""
    return x @ w, dy @ w.T, x.T @ dy


def _attention_core(q_BLGRK, k_BLGK, v_BLGK):
    """The L x L part of model_zoo.layers.Attention (scores, causal mask, softmax, mix)."""
    L, K = q_BLGRK.shape[1], q_BLGRK.shape[-1]
    logits = jnp.einsum('blgrk,bmgk->bgrlm', q_BLGRK, k_BLGK,
                        preferred_element_type=jnp.float32) * K ** -0.5
    pos = jnp.arange(L)
    logits = jnp.where(pos[:, None] >= pos[None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q_BLGRK.dtype)
    return jnp.einsum('bgrlm,bmgk->blgrk', probs, v_BLGK)


def gemm_fns(cfg) -> tuple[dict[str, Callable[[], Any]], dict[str, dict]]:
    """Each GEMM shape of the transformer as a standalone dense layer's training triple, the
    attention core (fwd+bwd) and a square 2048 matmul: (fns, {name: shape, count, flops})."""
    m = cfg.model
    B, L = cfg.train.global_batch_size, cfg.data.seq_len
    M, K = B * L, m.d_model // m.n_heads
    G, R = m.n_kv_heads, m.n_heads // m.n_kv_heads
    dt = jnp.dtype(m.compute_dtype)
    key = jax.random.key(1)

    def rand(*shape, dtype=dt):
        return jax.random.normal(key, shape, dtype)

    dense = jax.jit(_dense_fwd_bwd)
    fns, meta = {}, {}
    for name, (rows, k_in, n_out), count in (
            ('q / out proj', (M, m.d_model, m.n_heads * K), 2 * m.n_layers),
            ('k, v proj', (M, m.d_model, m.n_kv_heads * K), 2 * m.n_layers),
            ('mlp gate, up', (M, m.d_model, m.d_ff), 2 * m.n_layers),
            ('mlp down', (M, m.d_ff, m.d_model), m.n_layers),
            ('readout', (M, m.d_model, m.vocab_size), 1)):
        args = rand(rows, k_in), rand(k_in, n_out), rand(rows, n_out)
        fns[name] = lambda args=args: dense(*args)
        meta[name] = dict(shape=f'{rows}x{k_in}x{n_out}', count=count, flops=6.0 * rows * k_in * n_out)
    qkvd = rand(B, L, G, R, K), rand(B, L, G, K), rand(B, L, G, K), rand(B, L, G, R, K)
    attn = jax.jit(lambda q, k, v, d: jax.vjp(_attention_core, q, k, v)[1](d))
    fns['attention core'] = lambda: attn(*qkvd)
    meta['attention core'] = dict(shape=f'{B}x{m.n_heads}x{L}x{L}', count=m.n_layers,
                                  flops=12.0 * B * L * L * m.d_model)   # the formula's term
    fns['square matmul'], flops = square_matmul()
    meta['square matmul'] = dict(shape='2048x2048x2048', count=0, flops=flops)
    return fns, meta


def phase_fns(case: Case) -> tuple[dict[str, Callable[[], Any]], float]:
    """Forward, forward+backward and the optimizer update, each jitted alone with the trainer's
    shardings, plus the train step itself; and XLA's FLOP count of the forward."""
    setup = case.setup
    loss_fn, definition, optimizer = setup.family.loss, setup.model_def, setup.optimizer
    p_sh, b_sh = setup.state_shardings.params, setup.batch_sharding

    def loss_of(p, b):
        return loss_fn(definition.merge(p), b)[0]

    def update(g, o, p):
        updates, o = optimizer.update(g, o, p)
        return optax.apply_updates(p, updates), o

    fwd = jax.jit(loss_of, in_shardings=(p_sh, b_sh))
    fwd_bwd = jax.jit(jax.value_and_grad(loss_of), in_shardings=(p_sh, b_sh),
                      out_shardings=(None, p_sh))
    opt = jax.jit(update, in_shardings=(p_sh, setup.state_shardings.opt_state, p_sh),
                  out_shardings=(p_sh, setup.state_shardings.opt_state))
    batch = case.batch
    # Copies: the train step donates its state, which would delete arrays shared with it.
    params = jax.tree.map(jnp.copy, case.state.params)
    opt_state = jax.tree.map(jnp.copy, case.state.opt_state)
    grads = fwd_bwd(params, batch)[1]
    fns = {'forward': lambda: fwd(params, batch),
           'forward+backward': lambda: fwd_bwd(params, batch),
           'optimizer update': lambda: opt(grads, opt_state, params),
           'train step': case.step}
    return fns, _xla_flops(fwd.lower(params, batch).compile()) or math.nan


_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+) = (?P<shape>\([^=]*?\)|\S+) '
                    r'(?P<op>[\w\-]+)\((?P<rest>.*)$')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+) .*\{\s*$')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')


@dataclasses.dataclass
class HloOp:
    op: str
    shape: str
    ops_inside: set[str]    # opcodes of the instruction and the computations it calls
    op_name: str            # jax's name stack: 'transpose(jvp(...))' marks the backward pass
    source: tuple[str, str, int] | None   # innermost user frame: (file, function, line)

    @property
    def elements(self) -> int:
        dims = re.match(r'\w+\[([\d,]*)\]', self.shape)   # e.g. f32[16,4,256,256]{3,2,1,0}
        return math.prod(int(d) for d in dims[1].split(',') if d) if dims else 0


def _hlo_ops(hlo: str) -> dict[str, HloOp]:
    """Compiled HLO text -> {instruction name: HloOp}, with source lines from its frame tables."""
    tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
    raw: dict[str, tuple[str, str, list[str], str, int | None]] = {}
    comps: dict[str, set[str]] = collections.defaultdict(set)
    section, current = '', ''
    for line in hlo.splitlines():
        if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
            section = line
            continue
        if section and (row := _TABLE_ROW.match(line)):
            tables[section][int(row[1])] = row[2]
            continue
        section = ''
        if (c := _COMP.match(line)) and ' = ' not in line:
            current = c['name']
            continue
        if (i := _INSTR.match(line)):
            calls = re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', i['rest'])
            name = re.search(r'op_name="([^"]*)"', i['rest'])
            frame = re.search(r'stack_frame_id=(\d+)', i['rest'])
            raw[i['name']] = (i['op'], i['shape'], calls, name[1] if name else '',
                              int(frame[1]) if frame else None)
            comps[current].add(i['op'])

    def source(frame_id: int | None) -> tuple[str, str, int] | None:
        # The frame of an op is its innermost frame outside jax: the line that called jax.
        frame = tables['StackFrames'].get(frame_id or -1)
        loc_id = re.search(r'file_location_id=(\d+)', frame or '')
        loc = tables['FileLocations'].get(int(loc_id[1])) if loc_id else None
        if loc is None:
            return None
        f = re.search(r'file_name_id=(\d+) function_name_id=(\d+) line=(\d+)', loc)
        file = tables['FileNames'].get(int(f[1]), '?').strip('"')
        func = tables['FunctionNames'].get(int(f[2]), '?').strip('"')
        return file, func, int(f[3])

    ops = {}
    for name, (op, shape, calls, op_name, frame) in raw.items():
        inside = {op}.union(*(comps.get(c, set()) for c in calls))
        ops[name] = HloOp(op, shape, inside, op_name, source(frame))
    return ops


def _where(op: HloOp, score_elements: int) -> str:
    """Which part of the model an op belongs to, from its source frame and size."""
    if op.source is None:
        return 'no source line (XLA-inserted copies etc.)'
    file, func, _ = op.source
    if ('/optax/' in file and '/losses/' not in file) or file.endswith('pretrain/schedules.py'):
        return 'optimizer update (optax)'
    if '/losses/' in file or func == 'lm_loss':
        return 'cross-entropy loss'
    if file.endswith('pretrain/step.py'):
        return 'train step (grad/param norms)'
    if func == 'Attention.__call__':
        # Only the attention scores/probabilities have B*H*L*L elements.
        return 'attention L×L (scores, softmax, mix)' if op.elements == score_elements \
            else 'attention projections'
    return {'rope': 'attention RoPE', 'SwiGLU.__call__': 'MLP (SwiGLU)', 'RMSNorm.__call__': 'RMSNorm',
            'Embedding.__call__': 'embedding', 'Embedding.attend': 'readout',
            'Transformer.__call__': 'readout', 'Block.__call__': 'residual adds'}.get(func, 'other')


def _trace_step(case: Case) -> tuple[list[dict], float]:
    """Events of one traced train step, and its wall time."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(case.step())
            wall = time.perf_counter() - start
        paths = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs
                 if f == 'perfetto_trace.json.gz']
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    return (trace['traceEvents'] if isinstance(trace, dict) else trace), wall


def profile_steps(cases: dict[str, Case], rounds: int) -> dict[str, dict[str, Any]]:
    """Traces one step of each case per round (interleaved, like the timings) with jax.profiler;
    per case, mean thunk seconds per step by model part and by source line."""
    out = {}
    per_op = {k: collections.Counter() for k in cases}
    walls = {k: 0.0 for k in cases}
    ops = {k: _hlo_ops(c.compiled.as_text()) for k, c in cases.items()}
    for _ in range(rounds):
        for k, case in cases.items():
            events, wall = _trace_step(case)
            walls[k] += wall / rounds
            for e in events:
                # Events not naming an HLO instruction are runtime bookkeeping (dispatch, waits).
                name = e.get('args', {}).get('hlo_op', e.get('name'))
                if e.get('ph') == 'X' and name in ops[k]:
                    per_op[k][name] += e.get('dur', 0) * 1e-6 / rounds
    for k, case in cases.items():
        cfg = case.setup.cfg
        rows_per_device = cfg.train.global_batch_size // case.setup.mesh.size
        score = rows_per_device * cfg.model.n_heads * cfg.data.seq_len ** 2
        groups: collections.Counter = collections.Counter()
        lines: collections.Counter = collections.Counter()
        for name, sec in per_op[k].items():
            op = ops[k][name]
            kind = 'matmul' if op.ops_inside & {'dot', 'convolution'} else 'other'
            groups[(_where(op, score), kind)] += sec
            if op.source:
                file, _, line = op.source
                phase = 'bwd' if 'transpose(' in op.op_name else 'fwd'
                if _where(op, score).startswith('optimizer'):
                    phase = 'update'
                lines[(os.path.relpath(file) if '.venv' not in file else os.path.basename(file),
                       line, phase, kind)] += sec
        out[k] = dict(wall_s=walls[k], thunk_s=max(sum(per_op[k].values()), 1e-12), groups=groups,
                      lines=lines)
    return out


# --- Report --------------------------------------------------------------------------------

def _fmt_s(x: float) -> str:
    return f'{x:.3f}' if x < 10 else f'{x:.1f}'


def _pct(x: float, peak: float) -> str:
    return f'{100 * x / peak:.0f}%'


def header(rows: list[Row], peak: float, peak_note: str, matmul: dict[str, float],
           ref: dict[str, float], command: str, total_s: float, steps: int,
           loads: list[float]) -> list[str]:
    dev = jax.devices()[0]
    lines = [
        '# Train-step throughput', '',
        f'Generated by `{command}` on {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} '
        f'({total_s / 60:.1f} min).', '',
        f'- machine: platform `{dev.platform}`, device kind `{dev.device_kind}`, '
        f'{os.cpu_count()} CPU cores ({platform.machine()}), {jax.device_count()} JAX device(s) '
        '(simulated with `--xla_force_host_platform_device_count` on CPU)',
        f'- jax {jax.__version__}, jaxlib {importlib.metadata.version("jaxlib")}, '
        f'python {platform.python_version()}',
        f'- peak for MFU: **{peak / 1e9:.1f} GFLOP/s** ({peak_note})' + (
            '; `measure_matmul_flops`: ' + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in matmul.items())
            + ' GFLOP/s' if matmul else ''),
        '- every row builds the trainer\'s own pieces (config validation, mesh, logical-axis '
        'rules, AdamW chain, sharded state, jitted `train_step` with donation) and feeds a '
        'random-token batch placed with the batch sharding;',
        f'- the configurations are timed round-robin, {steps} steps each after a warm-up step '
        '(`block_until_ready` per step), so all see the same background load: step s is the '
        'best step, the median in brackets; tokens/s, GFLOP/s and MFU use the best step;',
        '- CPU s/step: process CPU time of the best step (all threads; ≈ cores × wall on a quiet '
        'machine), a measure of work that background load inflates much less than wall time;',
        '- GFLOP/s use the family\'s `flops_per_example` (6·N + 12·layers·seq·d per token); '
        '"XLA/formula" is the compiled program\'s cost analysis over that formula;',
        '- "MFU by CPU time": FLOPs per CPU second of the step over those of a 2048² float32 '
        f'matmul timed in the same rounds ({ref["cpu"] / 1e9:.1f} GFLOP per CPU second; '
        f'{ref["wall"] / 1e9:.1f} GFLOP/s wall): the MFU that background load barely moves;',
        '- the machine is shared with other jobs (1-min load average '
        + ' → '.join(f'{x:.1f}' for x in loads) + ' over the run): read rows as ratios within '
        'this run.', '',
        '| config | params | batch×seq | dev | compute | remat | compile s | step s | CPU s/step '
        '| tokens/s | GFLOP/s | MFU | MFU by CPU time | XLA/formula |',
        '|---|---:|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        ratio = f'{r.xla_flops * r.devices / r.flops_per_step:.2f}' if r.xla_flops else 'n/a'
        lines.append(
            f'| {r.label} | {r.params / 1e6:.2f}M | {r.batch}×{r.seq_len} | {r.devices} | {r.dtype} '
            f'| {r.remat} | {r.compile_s:.1f} | {_fmt_s(r.step_s)} ({_fmt_s(statistics.median(r.step_times))}) '
            f'| {_fmt_s(min(r.cpu_times))} '
            f'| {r.tokens_per_s:,.0f} | {r.flops_per_s / 1e9:.1f} '
            f'| {100 * peak_flops_lib.mfu(r.flops_per_s, peak):.1f}% | {r.cpu_mfu(ref["cpu"]):.0%} | {ratio} |')
    return lines + ['']


def _profile_section(profiles: dict[str, dict], steps: int) -> list[str]:
    """Tables of thunk time by model part (per remat variant) and by source line."""
    labels = list(profiles)
    first = profiles[labels[0]]
    keys = sorted({k for p in profiles.values() for k in p['groups']},
                  key=lambda k: -first['groups'].get(k, 0.0))
    out = [f'**Profile.** `jax.profiler` traces of one train step per variant in each of {steps} '
           'rounds; XLA:CPU thunk seconds per step (mean over the rounds), attributed to the '
           'model source line of each HLO op through the compiled HLO\'s stack frames '
           '("matmul" = an op containing a dot):', '',
           '| part of the model | kind | ' + ' | '.join(f'{l} s/step' for l in labels) + ' |',
           '|---|---|' + '---:|' * len(labels)]
    small = collections.Counter()
    for where, kind in keys:
        vals = [profiles[l]['groups'].get((where, kind), 0.0) for l in labels]
        if max(vals) < 0.002:   # fold the crumbs into one row
            for l, v in zip(labels, vals):
                small[l] += v
            continue
        out.append(f'| {where} | {kind} | ' + ' | '.join(f'{v:.3f}' for v in vals) + ' |')
    out.append('| everything under 2 ms | | ' + ' | '.join(f'{small[l]:.3f}' for l in labels) + ' |')
    out.append('| **sum of thunks** (wall per step) | | ' + ' | '.join(
        f'**{profiles[l]["thunk_s"]:.3f}** ({profiles[l]["wall_s"]:.3f})' for l in labels) + ' |')
    out += ['', f'Top source lines ({labels[0]}; bwd = ops of the backward pass):', '',
            '| line | pass | kind | s/step | share | code |', '|---|---|---|---:|---:|---|']
    for (file, line, phase, kind), sec in first['lines'].most_common(12):
        code = linecache.getline(file, line).strip().replace('|', '\\|')[:72]
        out.append(f'| {file}:{line} | {phase} | {kind} | {sec:.3f} | '
                   f'{100 * sec / first["thunk_s"]:.0f}% | `{code}` |')
    return out + ['']


def measure_breakdown(cases: dict[str, Case], repeats: int, do_profile: bool) -> dict[str, Any]:
    """Timings for the 'where the time goes' section, on the largest size (one device)."""
    case = cases['none']
    # Phases, standalone GEMMs and a square matmul in the same rounds: comparable numbers.
    with case.setup.activate():
        pfns, xla_fwd = phase_fns(case)
        gfns, meta = gemm_fns(case.setup.cfg)
        wall, cpu = interleaved({**pfns, **gfns}, repeats)
    best = {k: min(v) for k, v in wall.items()}
    profiles = {}
    if do_profile:
        profiles = profile_steps({f'remat={k}': cases[k] for k in ('none', 'dots') if k in cases},
                                 max(2, repeats // 3))
    cpu_best = {k: min(v) for k, v in cpu.items()}
    return dict(best=best, cpu=cpu_best, xla_fwd=xla_fwd, meta=meta, profiles=profiles,
                repeats=repeats, ref=meta['square matmul']['flops'] / best['square matmul'],
                ref_cpu=meta['square matmul']['flops'] / cpu_best['square matmul'])


def analyse(rows: dict[str, Row], cases: dict[str, Case], data: dict[str, Any],
            peak: float, table_ref_cpu: float) -> list[str]:
    """The 'where the time goes' section for the largest size (one device)."""
    base, case = rows['none'], cases['none']
    cfg = case.setup.cfg
    m = cfg.model
    best, xla_fwd, meta, ref = data['best'], data['xla_fwd'], data['meta'], data['ref']
    cpu, ref_cpu = data['cpu'], data['ref_cpu']
    repeats, profiles = data['repeats'], data['profiles']
    out = ['## Where the time goes', '',
           f'Largest size `{base.label}` (d={m.d_model}, {m.n_layers} layers, {m.n_heads} heads / '
           f'{m.n_kv_heads} kv, d_ff={m.d_ff}, batch {base.batch}×{base.seq_len}), float32, 1 device: '
           f'{base.flops_per_s / 1e9:.1f} GFLOP/s = **{_pct(base.flops_per_s, peak)} of the '
           f'measured matmul peak** in the table, {base.cpu_mfu(table_ref_cpu):.0%} by CPU time; '
           'the goal is 50%.', '']
    fwd, fb, opt, step = (best[k] for k in ('forward', 'forward+backward', 'optimizer update',
                                            'train step'))
    fwd_formula = base.flops_per_step / 3   # the formula counts 1x forward + 2x backward
    out += [f'Below, every time is the best of {repeats} rounds in which the phases (each '
            'jitted alone with the trainer\'s shardings), the train step, the standalone matmuls '
            f'and a 2048² float32 matmul ran interleaved; that matmul reached {ref / 1e9:.1f} GFLOP/s '
            f'({ref_cpu / 1e9:.1f} GFLOP per CPU second) in them, and "% of square matmul" is '
            'relative to it, by wall time and by CPU time.', '',
            '**Phases.**', '',
            '| phase | s | × train step | CPU s | GFLOP/s (formula) | % of square matmul '
            '| same, by CPU time |', '|---|---:|---:|---:|---:|---:|---:|']
    for name, sec, cpu_s, flops in (
            ('forward (loss)', fwd, cpu['forward'], fwd_formula),
            ('forward+backward', fb, cpu['forward+backward'], base.flops_per_step),
            ('backward (difference)', fb - fwd, cpu['forward+backward'] - cpu['forward'], 2 * fwd_formula),
            ('optimizer update (clip, Adam, decay)', opt, cpu['optimizer update'], None),
            ('train step', step, cpu['train step'], base.flops_per_step)):
        rate = (f'{flops / sec / 1e9:.1f} | {_pct(flops / sec, ref)} | {_pct(flops / cpu_s, ref_cpu)}'
                if flops and sec > 0 and cpu_s > 0 else '– | – | –')
        out.append(f'| {name} | {sec:.3f} | {sec / step:.2f} | {cpu_s:.3f} | {rate} |')
    out.append('')

    if base.xla_flops:
        out += [f'**FLOP count.** XLA\'s cost analysis of the compiled step: '
                f'{base.xla_flops / 1e9:.1f} GFLOP vs the formula\'s {base.flops_per_step / 1e9:.1f} '
                f'({base.xla_flops / base.flops_per_step:.2f}×); forward alone {xla_fwd / 1e9:.1f} vs '
                f'{fwd_formula / 1e9:.1f} ({xla_fwd / fwd_formula:.2f}×). Both count the masked half '
                'of causal attention; they agree, so the MFU is not an artefact of the formula.', '']

    g = {k: dict(v, time_s=best[k], total_s=best[k] * v['count'], gflops=v['flops'] / best[k] / 1e9,
                 cpu_pct=_pct(v['flops'] / cpu[k], ref_cpu))
         for k, v in meta.items()}
    attn, square = g.pop('attention core'), g.pop('square matmul')
    gemm_s = sum(v['total_s'] for v in g.values())
    gemm_flops = sum(v['flops'] * v['count'] for v in g.values())
    out += ['**Matmuls alone.** Each GEMM shape of the model as a standalone dense layer\'s '
            'training triple (y = xW, dx = dy·Wᵀ, dW = xᵀ·dy), and the attention core (scores, '
            'mask, softmax, mix; forward+backward):', '',
            '| op | shape | per step | s each | s per step | GFLOP/s | % of square matmul '
            '| same, by CPU time |', '|---|---|---:|---:|---:|---:|---:|---:|']
    for name, v in [*g.items(), ('attention core', attn), ('square matmul (reference)', square)]:
        out.append(f'| {name} | {v["shape"]} | {v["count"]} | {v["time_s"]:.4f} | '
                   f'{v["total_s"]:.3f} | {v["gflops"]:.1f} | {_pct(v["gflops"] * 1e9, ref)} | '
                   f'{v["cpu_pct"]} |')
    attn_flops = attn['flops'] * attn['count']
    out += ['',
            f'Projection/MLP/readout GEMMs: {gemm_s:.3f} s for {gemm_flops / 1e9:.1f} GFLOP '
            f'({_pct(gemm_flops / gemm_s, ref)} of the square matmul). Attention core: {attn["total_s"]:.3f} s '
            f'for {attn_flops / base.flops_per_step:.0%} of the formula\'s FLOPs '
            f'({_pct(attn_flops / attn["total_s"], ref)}). Together '
            f'{gemm_s + attn["total_s"]:.3f} s = {(gemm_s + attn["total_s"]) / fb:.0%} of the '
            f'forward+backward ({fb:.3f} s).', '']
    phases = dict(best, attn_flops=attn_flops, ref=ref, ref_cpu=ref_cpu, cpu=cpu,
                  table_ref_cpu=table_ref_cpu)

    if profiles:
        out += _profile_section(profiles, max(2, repeats // 3))
    out += _findings(rows, phases, gemm_s, gemm_flops, attn, profiles, peak)
    return out


def _findings(rows: dict[str, Row], phases: dict, gemm_s: float, gemm_flops: float,
              attn: dict, profiles: dict, peak: float) -> list[str]:
    base = rows['none']
    fwd, fb, opt, step = (phases[k] for k in ('forward', 'forward+backward', 'optimizer update',
                                              'train step'))
    attn_s, attn_flops, ref = attn['total_s'], phases['attn_flops'], phases['ref']
    ach = base.flops_per_s / peak
    rest = fb - gemm_s - attn_s
    lines = ['**Findings** (numbers from this run):', '',
             '- Against the 50% goal the float32 step reaches: ' + ', '.join(
                 f'{x:.0%} {what} ({"meets" if x >= 0.5 else "misses"})' for x, what in (
                     (ach, 'of the peak in the table'),
                     (base.cpu_mfu(phases['table_ref_cpu']), 'by CPU time in the table'),
                     (base.flops_per_step / step / ref, 'of the square matmul in the rounds above'),
                     (base.flops_per_step / phases['cpu']['train step'] / phases['ref_cpu'],
                      'of it by CPU time'))) + '.',
             f'- Forward+backward is {fb / step:.0%} of the step and the optimizer update '
             f'{opt / step:.1%}' + (' (over 100%: background load still distorted these rounds)'
                                    if fb > step else '')
             + f'; the backward costs {(fb - fwd) / fwd:.1f}× the forward (its FLOPs predict 2×).',
             f'- At the model\'s shapes the projection/MLP GEMMs alone reach '
             f'{_pct(gemm_flops / gemm_s, ref)} of the square matmul, the attention core '
             f'{_pct(attn_flops / attn_s, ref)}; if nothing else cost time the step would reach '
             f'{_pct(base.flops_per_step / (gemm_s + attn_s + opt), ref)}.',
             f'- Of the {fb:.3f} s forward+backward, standalone GEMMs explain {gemm_s:.3f} s and the '
             f'attention core {attn_s:.3f} s; the other {rest:.3f} s ({rest / fb:.0%}) is non-matmul '
             'work (norms, RoPE, SiLU, loss, embedding scatter, layout copies) plus GEMMs running '
             'slower inside the step than alone.']
    if 'remat=none' in profiles:
        p = profiles['remat=none']
        mm = sum(v for (_, k), v in p['groups'].items() if k == 'matmul')
        lxl = sum(v for (w, _), v in p['groups'].items() if w.startswith('attention L×L'))
        lines.append(f'- Profile: matmul ops take {mm / p["thunk_s"]:.0%} of thunk time; ops on the '
                     'B×H×L×L attention tensors (score and probability matmuls, mask, softmax, '
                     f'their gradients and layout copies) take {lxl / p["thunk_s"]:.0%}, for '
                     f'{attn_flops / base.flops_per_step:.0%} of the FLOPs.')
        top = [(k, v) for k, v in p['lines'].most_common() if k[3] == 'other'][:3]
        lines.append('- The costliest non-matmul lines: ' + '; '.join(
            f'{file}:{line} {phase} (`{linecache.getline(file, line).strip()[:40]}`…) '
            f'{v / p["thunk_s"]:.0%}' for (file, line, phase, _), v in top) + ' of thunk time.')
    for key, what in (('bf16', 'bfloat16 compute'), ('dots', 'remat=dots'), ('full', 'remat=full'),
                      ('data2', 'batch over 2 simulated devices (same cores)')):
        if key in rows:
            r = rows[key]
            lines.append(f'- {what}: {r.step_s:.3f} s/step ({min(r.cpu_times):.2f} CPU s) vs '
                         f'{base.step_s:.3f} s ({min(base.cpu_times):.2f} CPU s): '
                         f'{base.step_s / r.step_s:.2f}× the float32 / no-remat / 1-device speed by '
                         f'wall time, {min(base.cpu_times) / min(r.cpu_times):.2f}× by CPU time.')
    if 'remat=none' in profiles and 'remat=dots' in profiles:
        a, b = profiles['remat=none']['groups'], profiles['remat=dots']['groups']
        diffs = sorted(((b.get(k, 0) - a.get(k, 0), k) for k in set(a) | set(b)),
                       key=lambda d: -abs(d[0]))[:3]
        lines.append('- Largest profile differences, remat=dots minus remat=none (s/step): '
                     + ', '.join(f'{w} / {k} {d:+.3f}' for d, (w, k) in diffs) + '.')
    return lines


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    _force_host_devices(_DEVICES.value)
    t_start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    all_devices = jax.devices()
    dev0 = all_devices[0]
    print(f'{len(all_devices)} x {dev0.platform}/{dev0.device_kind}, jax {jax.__version__}', flush=True)

    matmul = {f'n={n}': peak_flops_lib.measure_matmul_flops(n, jnp.float32) for n in (2048, 4096)}
    print('matmul ' + ', '.join(f'{k} {v / 1e9:.1f}' for k, v in matmul.items()) + ' GFLOP/s',
          flush=True)

    one = [dev0]
    sizes = _SIZES.value
    largest = sizes[-1]
    cases = [Case(size if size != largest else 'none', size, make_config(size), one) for size in sizes]
    for key, label, kw in (('bf16', 'bfloat16', dict(compute_dtype='bfloat16')),
                           ('dots', 'remat=dots', dict(remat='dots')),
                           ('full', 'remat=full', dict(remat='full'))):
        cases.append(Case(key, f'{largest} {label}', make_config(largest, **kw), one))
    if len(all_devices) >= 2 and SIZES[largest]['batch'] % 2 == 0:
        cases.append(Case('data2', f'{largest} batch over 2 devices', make_config(largest),
                          all_devices[:2]))
    rows, ref = time_cases(cases, _STEPS.value, _WARMUP.value)
    loads.append(os.getloadavg()[0])
    by_key = {c.key: c for c in cases}
    if dev0.platform == 'cpu':
        # The same 2048² matmul timed between the steps is one more sample of the peak; under
        # background load the best sample is the closest to the machine's real peak.
        matmul['n=2048 between the steps'] = ref['wall']
        peak, peak_note = max(matmul.values()), 'best float32 matmul measured in this run'
    else:
        peak, src = peak_flops_lib.total_peak_flops([dev0])
        peak_note = f'one {dev0.device_kind}: {src}'

    analysis = []
    if _ANALYSE.value:
        # More rounds than the table: these timings are shorter, and are compared one by one.
        data = measure_breakdown(by_key, _STEPS.value + 3, _PROFILE.value)
        if dev0.platform == 'cpu':
            matmul['n=2048 in the breakdown rounds'] = data['ref']
            peak = max(matmul.values())
        analysis = analyse(rows, by_key, data, peak, ref['cpu'])
    loads.append(os.getloadavg()[0])
    command = 'python -m benchmarks.train_throughput' + ''.join(
        f' {shlex.quote(a)}' for a in sys.argv[1:])
    print(f'peak {peak / 1e9:.1f} GFLOP/s ({peak_note})', flush=True)
    lines = header(list(rows.values()), peak, peak_note, matmul if dev0.platform == 'cpu' else {},
                   ref, command, time.perf_counter() - t_start, _STEPS.value, loads) + analysis
    os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
    with open(_OUT.value, 'w') as f:
        f.write('\n'.join(lines).rstrip() + '\n')
    print(f'wrote {_OUT.value} in {(time.perf_counter() - t_start) / 60:.1f} min', flush=True)


if __name__ == '__main__':
    app.run(main)
