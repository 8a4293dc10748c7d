"""Config schema, defaults and validation.

A config file (configs/*.py) defines `get_config()` that starts from `base_config()` and
changes values; every key a run may use exists here, so the dict is locked and a typo is an
error. `validate` checks the whole config against the device count before any compute.
"""

import json
import math
from typing import Any

import ml_collections

from pretrain import scaling_rules
from pretrain.errors import ConfigError, check_choice

MESH_AXES = ('data', 'fsdp', 'tensor', 'sequence')
DTYPES = ('float32', 'bfloat16')
REMAT_POLICIES = ('none', 'full', 'dots')
NONFINITE_POLICIES = ('stop', 'skip')


def base_config() -> ml_collections.ConfigDict:
    """Every key a run can set, with defaults that train a tiny LM on the embedded corpus."""
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
    )
    # State-space models (family 'mamba', model_zoo/mamba.py); ignored by other families.
    c.model.ssm = dict(
        version=1,                 # 1 = Mamba-1 selective scan, 2 = Mamba-2 (SSD)
        d_state=16,                # N (16 for Mamba-1, 128 for Mamba-2 at full size)
        d_conv=4,                  # causal depthwise conv width
        expand=2,                  # d_inner = expand * d_model
        dt_rank=0,                 # Mamba-1 low-rank dt projection; 0 = ceil(d_model / 16)
        dt_min=1e-3,               # initial dt ~ exp(U[log dt_min, log dt_max]), >= dt_floor
        dt_max=1e-1,
        dt_floor=1e-4,
        scan='chunked',            # Mamba-1 scan: 'sequential' | 'associative' | 'chunked'
        chunk_size=64,             # chunked scan and SSD chunk length
        headdim=64,                # Mamba-2 head dim P (heads = d_inner / P)
        n_groups=1,                # Mamba-2 groups sharing B and C
        attn_every=0,              # hybrid: every k-th block is attention + MLP; 0 = none
    )
    # VAR families (model_zoo/var_tokenizer.py, model_zoo/var.py). The next-scale transformer's
    # width, depth and heads are model.d_model / n_layers / n_heads (configs use the depth
    # rule d_model = 64 x depth, n_heads = depth); the tokenizer's keys must match stage 1's.
    c.model.var = dict(
        patch_nums=(1, 2, 3, 4),   # token-map sizes, coarse to fine; the last is the latent size
        codebook_size=64,
        latent_channels=16,        # Cvae
        base_channels=32,          # tokenizer CNN width at full resolution
        channel_mult=(1, 2, 2),    # width multiple per resolution level (len - 1 halvings)
        n_phi=4,                   # shared phi refinement convs
        phi_ratio=0.5,             # phi(h) = (1 - r) h + r conv(h)
        beta=0.25,                 # VQ commitment weight
        dead_code_weight=0.1,      # pull of codes unused in a batch towards their nearest feature
        num_classes=10,            # class labels; index num_classes is the unconditional one
        cond_dropout=0.1,          # class dropout for classifier-free guidance
        mlp_ratio=4.0,
    )

    c.data = dict(
        source='stdlib',           # 'stdlib' | 'text_files' | 'tfds'
        seq_len=128,
        tokenizer='bytes',         # 'bytes' | 'sentencepiece'
        tokenizer_path='',         # SentencePiece .model file
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
        nonfinite_policy='stop',   # NaN/inf loss or grads: 'stop' (error) | 'skip' the update
    )

    c.optim = dict(
        name='adamw',
        lr=3e-3,                   # peak learning rate
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        # 'auto' (coupled under SP; under muP independent with per-step decay lr * weight_decay)
        # | 'coupled' (optax adamw) | 'independent' (of the LR) | 'mup_scaled'
        weight_decay_mode='auto',
        grad_clip=1.0,             # global-norm clip; 0 = off
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
    )

    c.schedule = dict(
        kind='wsd',                # 'constant' | 'cosine' | 'linear' | 'wsd'
        warmup_steps=50,
        total_steps=-1,            # -1 = train.steps, resolved to an absolute number
        decay_steps=100,           # length of the WSD decay phase
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
    )
    c.lock()  # changing values is fine; adding a key (a typo) is an error
    return c


def _positive(key: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f'{key}={value!r} must be an integer >= {minimum}')


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int, num_granules: int = 1,
             process_count: int = 1) -> dict[str, int]:
    """Checks the whole config against the devices; returns the mesh axis sizes (ici x dcn).

    Raises ConfigError naming the key, the value and what is allowed. Reads no data and
    computes nothing, so a bad config fails in seconds.
    """
    from model_zoo import FAMILIES  # the registry imports the families, which import pretrain
    from pretrain import data, mesh, optim, parametrization, schedules

    family = FAMILIES.get(cfg.model.family, 'model.family')
    ici, dcn = mesh.mesh_shape(cfg.mesh, num_devices, num_granules)
    mesh.merge_rules(cfg.mesh.rules)
    axes = {a: ici[a] * dcn[a] for a in MESH_AXES}

    t = cfg.train
    for key in ('steps', 'global_batch_size', 'grad_accum_steps', 'log_every', 'eval_batches'):
        _positive(f'train.{key}', t[key])
    _positive('train.eval_every', t.eval_every, 0)
    check_choice('train.nonfinite_policy', t.nonfinite_policy, NONFINITE_POLICIES)
    if t.global_batch_size % t.grad_accum_steps:
        raise ConfigError(f'train.global_batch_size={t.global_batch_size} must be divisible by '
                          f'train.grad_accum_steps={t.grad_accum_steps}')
    micro = t.global_batch_size // t.grad_accum_steps
    data_parallel = axes['data'] * axes['fsdp']
    if micro % data_parallel:
        raise ConfigError(
            f'train.global_batch_size={t.global_batch_size} / grad_accum_steps={t.grad_accum_steps} '
            f'= {micro} sequences per micro-batch must be divisible by the data-parallel size '
            f'data*fsdp = {axes["data"]}*{axes["fsdp"]} = {data_parallel}')
    if t.global_batch_size % process_count:
        raise ConfigError(f'train.global_batch_size={t.global_batch_size} must be divisible by the '
                          f'number of processes ({process_count})')

    _positive('data.seq_len', cfg.data.seq_len)
    if cfg.data.seq_len % axes['sequence']:
        raise ConfigError(f'data.seq_len={cfg.data.seq_len} must be divisible by the sequence '
                          f'axis size {axes["sequence"]}')
    if family.data == 'text':
        data.check_data_config(cfg.data)
        vocab = data.make_tokenizer(cfg.data).vocab_size
        if cfg.model.vocab_size < vocab:
            raise ConfigError(f'model.vocab_size={cfg.model.vocab_size} is smaller than the '
                              f'{cfg.data.tokenizer!r} tokenizer vocabulary ({vocab})')
    elif family.data == 'image':
        data.check_image_config(cfg.data.image)

    optim.validate(cfg.optim)
    parametrization.from_config(cfg)
    scaling_rules.validate(cfg)
    schedules.spec_from_config(cfg.schedule, cfg.optim.lr, t.steps)
    c = cfg.checkpoint
    _positive('checkpoint.every_steps', c.every_steps)
    _positive('checkpoint.keep_last', c.keep_last)
    _positive('checkpoint.keep_every', c.keep_every, 0)
    minutes = c.every_minutes
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
        raise ConfigError(f'checkpoint.every_minutes={minutes!r} must be a number >= 0 (0 = off)')
    if cfg.metrics.peak_flops_per_device < 0:
        raise ConfigError(f'metrics.peak_flops_per_device={cfg.metrics.peak_flops_per_device} '
                          'must be >= 0 (0 = automatic)')
    family.validate(cfg, axes)
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
