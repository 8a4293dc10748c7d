"""Config schema, defaults and validation of the trainer's own keys.

A config file (configs/*.py) defines `get_config()` that starts from `model_zoo.base_config()`
(these core keys plus every model family's section) and changes values; every key a run may
use exists there, so the dict is locked and a typo is an error. `validate` checks the whole
config against the device count and the configured family before any compute.
"""

import importlib.util
import json
import math
from typing import Any

import ml_collections

from pretrain import branching, data, mesh, optim, parametrization, scaling_rules, schedules
from pretrain.errors import ConfigError, check_choice

NONFINITE_POLICIES = ('stop', 'skip')
WANDB_MODES = ('offline', 'online', 'disabled')
# Attention kernels (model_zoo/attention.py); 'splash' is a TPU kernel, interpreted elsewhere.
ATTENTION_IMPLS = ('xla', 'dot_product', 'blockwise', 'splash')


def core_config() -> ml_collections.ConfigDict:
    """The trainer's keys, with defaults that train a tiny LM on the embedded corpus."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = dict(
        family='transformer',
        vocab_size=320,            # >= the tokenizer's vocabulary; divisible by the tensor axis
        d_model=128,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,              # grouped-query attention when < n_heads
        d_ff=384,                  # SwiGLU hidden size
        rope_theta=10_000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        init_std=0.02,
        param_dtype='float32',
        compute_dtype='float32',   # 'bfloat16' for mixed precision
        remat='none',              # 'none' | 'full' | 'dots'
        attention_impl='xla',      # 'xla' | 'dot_product' | 'blockwise' | 'splash'
        attention_block_size=512,  # blockwise/splash: queries and keys per block (capped at the length)
    )
    # A family's own keys (model.ssm, model.var, ...) are added by model_zoo.base_config().

    c.data = dict(
        source='stdlib',           # 'stdlib' | 'text_files' | 'tfds'
        seq_len=128,
        tokenizer='bytes',         # 'bytes' | 'sentencepiece' | 'hf'
        tokenizer_path='',         # SentencePiece .model file, or an HF tokenizer.json
        text_dir='',               # folder of text files (source='text_files')
        tfds_name='',              # registered TFDS builder name (source='tfds')
        tfds_data_dir='',
        tfds_train_split='train',
        tfds_eval_split='validation',
        tfds_text_key='text',
        eval_percent=2,            # percent of files held out, chosen by a hash of the path
        max_files=0,               # 0 = all files; small values make quick tests
        cache_dir='',              # tokenized-stream cache; '' = no on-disk cache
    )
    # Image data (pretrain/data/images.py), used by families with data='image'.
    c.data.image = dict(
        source='digits',           # 'digits' (scikit-learn's bundled 8x8 digits) | 'tfds'
        image_size=16,
        eval_percent=10,           # percent of images held out (every k-th image)
        tfds_name='',              # e.g. 'local_image_folder' (prepared from image_dir)
        tfds_data_dir='',
        image_dir='',              # folder of <class>/<image> files for 'local_image_folder'
        tfds_train_split='train',
        tfds_eval_split='validation',
        tokenizer_dir='',          # stage-2 only: the workdir of a trained var_tokenizer run
    )

    c.train = dict(
        steps=500,
        global_batch_size=16,      # sequences per optimizer step, over all devices
        grad_accum_steps=1,        # micro-batches per step
        log_every=10,
        eval_every=100,            # 0 = never
        eval_batches=4,
        nonfinite_policy='stop',   # NaN/inf loss, grads or new state: 'stop' (error) | 'skip'
        max_consecutive_skips=10,  # 'skip' stops (as 'stop' does) after this many skips in a row
    )

    c.optim = dict(
        name='adamw',              # 'adamw' | 'muon' | 'adafactor' (pretrain/optim.py)
        lr=3e-3,                   # peak learning rate
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        # 'auto' (coupled under SP; under muP independent with per-step decay lr * weight_decay)
        # | 'coupled' (optax adamw) | 'independent' (of the LR) | 'mup_scaled'
        weight_decay_mode='auto',
        grad_clip=1.0,             # global-norm clip; 0 = off
        **optim.default_config(),  # optim.muon, optim.adafactor
    )

    c.parametrization = dict(
        name='sp',                 # 'sp' | 'mup' | 'depth_mup' (see pretrain/parametrization.py)
        base_width=0,              # d_model the hyper-parameters were tuned at; 0 = this model
        base_depth=0,              # n_layers of that base model; 0 = this model
        depth_alpha=0.5,           # depth_mup residual exponent: 0.5 depth-muP, 1.0 CompleteP
        input_mult=1.0,            # embedding output multiplier (alpha_in)
        output_mult=1.0,           # readout multiplier (alpha_out; divided by m under muP)
        base_head_dim=0,           # head dim of the base model; 0 = base_width / n_heads
        zero_readout=False,        # initialise the readout at zero (needs an untied readout)
        zero_query=False,          # initialise attention query projections at zero
        scale_eps=True,            # Adam eps follows each role's gradient size under muP
        # Per-role LR multipliers on top of the parametrization's rules (tuned at the base like
        # input_mult; 1.0 leaves the rule as it is). Roles: pretrain/parametrization.py.
        role_lr_mult=dict(embedding=1.0, hidden=1.0, hidden_fan_in=1.0, hidden_to_fixed=1.0,
                          readout=1.0, vector=1.0),
        # The same for the init (a multiplier of each role's init scale; 0 is allowed).
        role_init_mult=dict(embedding=1.0, hidden=1.0, hidden_fan_in=1.0, hidden_to_fixed=1.0,
                            readout=1.0, vector=1.0),
    )

    c.schedule = dict(
        kind='wsd',                # 'constant' | 'cosine' | 'linear' | 'wsd'
        # Warmup and WSD decay lengths: a step count or a fraction of total_steps, not both;
        # -1 = unset. With neither, 10% warmup and 20% decay (schedules.DEFAULT_FRACTIONS). A
        # fraction is resolved to steps before the run, and checkpoints store the steps.
        warmup_steps=-1,
        warmup_fraction=-1.0,
        total_steps=-1,            # -1 = train.steps, resolved to an absolute number
        decay_steps=-1,            # length of the WSD decay phase
        decay_fraction=-1.0,
        decay_shape='1-sqrt',      # WSD decay: 'linear' | 'cosine' | '1-sqrt'
        min_lr_ratio=0.0,          # floor = lr * min_lr_ratio
        allow_resume_change=False,  # resuming with a schedule unlike the checkpoint's is an error
        branch_from='',            # 'PARENT_WORKDIR@STEP': start from that checkpoint (pretrain/branching.py)
    )

    # Derive optimizer values / batch size from a reference run (pretrain/scaling_rules.py).
    c.scaling = scaling_rules.default_config()

    c.checkpoint = dict(
        every_steps=100,
        every_minutes=0.0,         # also save this long after the last save; 0 = off
        keep_last=3,
        keep_every=0,              # also keep every K-th step forever; 0 = off
        async_save=True,
    )

    c.mesh = dict(
        ici=dict(data=-1, fsdp=1, tensor=1, sequence=1),   # -1 = the remaining devices
        dcn=dict(data=1, fsdp=1, tensor=1, sequence=1),    # across processes/slices
        rules=(),                  # overrides of the logical-axis rules: ((name, mesh_axes), ...)
    )

    c.metrics = dict(
        peak_flops_per_device=0.0,  # 0 = look up the accelerator, or measure a matmul on CPU
        tensorboard=True,
        wandb_project='',          # Weights & Biases project; '' = off (wandb not imported)
        wandb_mode='offline',      # 'offline' (files under the workdir) | 'online' | 'disabled'
    )
    c.lock()  # changing values is fine; adding a key (a typo) is an error
    return c


def check_finite_numbers(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first float value anywhere in the config that is NaN or inf.

    No key means anything by NaN or inf, and a NaN passes every `x < bound` check (e.g.
    optim.grad_clip=nan would silently turn clipping off), so they are refused everywhere.
    """
    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, child in value.items():
                walk(f'{prefix}.{name}' if prefix else str(name), child)
        elif isinstance(value, (list, tuple)):
            for i, child in enumerate(value):
                walk(f'{prefix}[{i}]', child)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f'{prefix}={value!r} must be a finite number')

    walk('', cfg.to_dict())


def _positive(key: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f'{key}={value!r} must be an integer >= {minimum}')


def _check_attention(cfg: ml_collections.ConfigDict, family: Any, axes: dict[str, int]) -> None:
    m = cfg.model
    check_choice('model.attention_impl', m.attention_impl, ATTENTION_IMPLS)
    _positive('model.attention_block_size', m.attention_block_size)
    block = m.attention_block_size
    # A text model attends over data.seq_len tokens, each device over its sequence shard of
    # queries; a block that does not tile the shard would waste a padded block per shard.
    # (Other lengths, e.g. VAR's sum of squares, are padded by the kernel.)
    if m.attention_impl == 'blockwise' and family.data == 'text':
        local = cfg.data.seq_len // axes['sequence']
        if block < local and local % block:
            raise ConfigError(
                f'model.attention_block_size={block} must divide the per-device sequence length '
                f'data.seq_len / sequence = {cfg.data.seq_len} / {axes["sequence"]} = {local} '
                '(or be at least that length)')


def _check_wandb(metrics_cfg: ml_collections.ConfigDict) -> None:
    project = metrics_cfg.wandb_project
    check_choice('metrics.wandb_mode', metrics_cfg.wandb_mode, WANDB_MODES)
    # Looked up, not imported: only the process that logs imports it, when the run starts.
    if project and importlib.util.find_spec('wandb') is None:
        raise ConfigError(f'metrics.wandb_project={project!r} needs the wandb package: '
                          "pip install -e '.[wandb]' (or set metrics.wandb_project='' for off)")


def validate(cfg: ml_collections.ConfigDict, family: Any, *, num_devices: int,
             num_granules: int = 1, process_count: int = 1,
             check_data: bool = True) -> dict[str, int]:
    """Checks the whole config against the devices; returns the mesh axis sizes (ici x dcn).

    `family` is the model_zoo Family that cfg.model.family names (looked up by the caller); its
    own `validate` checks the model keys. Raises ConfigError naming the key, the value and what
    is allowed. Reads no data and computes nothing, so a bad config fails in seconds.
    check_data=False (a dry run, which reads no data) skips what the data needs: folders,
    tokenizer files and the family's check_data.
    """
    check_finite_numbers(cfg)
    _positive('seed', cfg.seed, 0)
    ici, dcn = mesh.mesh_shape(cfg.mesh, num_devices, num_granules)
    mesh.merge_rules(cfg.mesh.rules)
    axes = {a: ici[a] * dcn[a] for a in mesh.AXES}

    train_cfg = cfg.train
    for key in ('steps', 'global_batch_size', 'grad_accum_steps', 'log_every', 'eval_batches'):
        _positive(f'train.{key}', train_cfg[key])
    _positive('train.eval_every', train_cfg.eval_every, 0)
    check_choice('train.nonfinite_policy', train_cfg.nonfinite_policy, NONFINITE_POLICIES)
    _positive('train.max_consecutive_skips', train_cfg.max_consecutive_skips)
    batch, accum = train_cfg.global_batch_size, train_cfg.grad_accum_steps
    if batch % accum:
        raise ConfigError(f'train.global_batch_size={batch} must be divisible by '
                          f'train.grad_accum_steps={accum}')
    micro = batch // accum
    data_parallel = axes['data'] * axes['fsdp']
    if micro % data_parallel:
        raise ConfigError(
            f'train.global_batch_size={batch} / grad_accum_steps={accum} '
            f'= {micro} sequences per micro-batch must be divisible by the data-parallel size '
            f'data*fsdp = {axes["data"]}*{axes["fsdp"]} = {data_parallel}')
    if batch % process_count:
        raise ConfigError(f'train.global_batch_size={batch} must be divisible by the '
                          f'number of processes ({process_count})')

    _positive('data.seq_len', cfg.data.seq_len)
    if cfg.data.seq_len % axes['sequence']:
        raise ConfigError(f'data.seq_len={cfg.data.seq_len} must be divisible by the sequence '
                          f'axis size {axes["sequence"]}')
    if check_data and family.data == 'text':
        data.check_data_config(cfg.data)
        vocab = data.make_tokenizer(cfg.data).vocab_size
        if cfg.model.vocab_size < vocab:
            raise ConfigError(f'model.vocab_size={cfg.model.vocab_size} is smaller than the '
                              f'{cfg.data.tokenizer!r} tokenizer vocabulary ({vocab})')
    elif check_data and family.data == 'image':
        data.check_image_config(cfg.data.image)

    _check_attention(cfg, family, axes)
    optim.validate(cfg.optim)
    # Every family has a width and a depth, and the parametrization divides by them: name the
    # model key here rather than parametrization.base_width (0 there means "this model").
    _positive('model.d_model', cfg.model.d_model)
    _positive('model.n_layers', cfg.model.n_layers)
    parametrization.from_config(cfg)
    scaling_rules.validate(cfg)
    spec = schedules.spec_from_config(cfg.schedule, cfg.optim.lr, train_cfg.steps)
    if spec.kind != 'constant' and spec.total_steps < train_cfg.steps:
        raise ConfigError(
            f'schedule.total_steps={spec.total_steps} is smaller than train.steps={train_cfg.steps}: '
            f'the last {train_cfg.steps - spec.total_steps} steps would train at the final LR '
            f'({spec.floor:g}). Set schedule.total_steps >= train.steps (-1 = train.steps).')
    if cfg.schedule.branch_from:
        branching.parse(cfg.schedule.branch_from)
    checkpoint_cfg = cfg.checkpoint
    _positive('checkpoint.every_steps', checkpoint_cfg.every_steps)
    _positive('checkpoint.keep_last', checkpoint_cfg.keep_last)
    _positive('checkpoint.keep_every', checkpoint_cfg.keep_every, 0)
    minutes = checkpoint_cfg.every_minutes
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
        raise ConfigError(f'checkpoint.every_minutes={minutes!r} must be a number >= 0 (0 = off)')
    if cfg.metrics.peak_flops_per_device < 0:
        raise ConfigError(f'metrics.peak_flops_per_device={cfg.metrics.peak_flops_per_device} '
                          'must be >= 0 (0 = automatic)')
    _check_wandb(cfg.metrics)
    family.validate(cfg, axes)
    if check_data and family.check_data is not None:   # after the shapes: it may read files
        family.check_data(cfg)
    return axes


def finalize(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A locked copy with derived values made absolute (e.g. schedule.total_steps)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.schedule.total_steps == -1:
        cfg.schedule.total_steps = cfg.train.steps
    cfg.lock()
    return cfg


def to_json(cfg: ml_collections.ConfigDict, **extra: Any) -> str:
    return json.dumps({**cfg.to_dict(), **extra}, indent=2, sort_keys=True, default=str)


def with_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A locked copy with dotted keys ('optim.lr') set; unknown keys are errors."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.lock()
    for key, value in overrides.items():
        *parents, leaf = key.split('.')
        node = out
        for name in parents:
            node = node[name]
        setattr(node, leaf, value)
    return out
