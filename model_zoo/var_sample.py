"""VAR sampling: scale by scale with a key/value cache, classifier-free guidance, top-k / top-p.

    python -m model_zoo.var_sample --workdir=runs/var --per_class=4   # -> runs/var/samples.png

K scales take K transformer calls (a raster-order model of the same token count needs one call
per token). Guidance: logits = (1 + t) cond - t uncond, with t = cfg_scale * k / (K - 1)
rising over the scales.

--more_smooth (the published VAR sampler's option of that name): the codes are sampled as
usual, but the feature each scale adds to f_hat is a Gumbel-softmax mix of the codebook instead
of the sampled code's vector, softmax((logits * (1 + r) + g) / tau) @ codebook with r = k / (K - 1),
g Gumbel noise and tau = max(0.27 (1 - 0.95 r), 0.005): soft early scales, nearly hard late ones,
which gives smoother images at some cost in detail.
"""

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_zoo.var import VAR
from model_zoo.var_tokenizer import VQVAE, next_input


def filter_logits(logits_BNV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Masks all but the top_k logits (0 = all), then all outside the top_p probability mass."""
    neg = jnp.finfo(logits_BNV.dtype).min
    if 0 < top_k < logits_BNV.shape[-1]:
        kth = jax.lax.top_k(logits_BNV, top_k)[0][..., -1:]
        logits_BNV = jnp.where(logits_BNV < kth, neg, logits_BNV)
    if 0.0 < top_p < 1.0:
        sorted_BNV = jnp.sort(logits_BNV, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_BNV, axis=-1)
        # Keep a token while the mass before it is below top_p (the first token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_BNV, jnp.inf), axis=-1, keepdims=True)
        logits_BNV = jnp.where(logits_BNV < threshold, neg, logits_BNV)
    return logits_BNV


Choose = Callable[[int, jax.Array], jax.Array]   # (scale k, logits [B, n, V]) -> codes [B, n]
# (scale k, guided logits [B, n, V]) -> the code vectors [B, n, C] that scale adds to f_hat
Embed = Callable[[int, jax.Array], jax.Array]


def scale_ratio(k: int, n_scales: int) -> float:
    """k / (K - 1): 0 at the first scale, 1 at the last; guidance and the smooth sampler ramp by it."""
    return k / max(n_scales - 1, 1)


def smooth_tau(k: int, n_scales: int) -> float:
    """The Gumbel-softmax temperature at scale k: 0.27 at the first scale, 0.0135 at the last."""
    return max(0.27 * (1 - 0.95 * scale_ratio(k, n_scales)), 0.005)


def smooth_embedding(logits_BNV: jax.Array, codebook_VC: jax.Array, key: jax.Array, k: int,
                     n_scales: int) -> jax.Array:
    """softmax((logits * (1 + r) + Gumbel noise) / tau) @ codebook: a soft code per token."""
    r = scale_ratio(k, n_scales)
    gumbel_BNV = jax.random.gumbel(key, logits_BNV.shape, jnp.float32)
    weights_BNV = jax.nn.softmax((logits_BNV.astype(jnp.float32) * (1 + r) + gumbel_BNV)
                                 / smooth_tau(k, n_scales), axis=-1)
    return jnp.einsum('bnv,vc->bnc', weights_BNV, codebook_VC.astype(jnp.float32))


def decode_scales(model: VAR, tokenizer: VQVAE, labels_B: jax.Array, choose: Choose,
                  cfg_scale: float = 0.0, embed: Embed | None = None):
    """Runs the scales in order with a KV cache; `choose` picks each scale's codes; `embed`,
    when given, replaces the chosen codes' vectors in f_hat (the smooth sampler).

    Returns (f_hat [B, h, w, C], codes per scale, guided logits per scale).
    """
    pns = model.patch_nums
    K, B = len(pns), labels_B.shape[0]
    guided = cfg_scale > 0
    if guided:   # one batch: conditional rows, then unconditional rows
        labels_B = jnp.concatenate([labels_B, jnp.full_like(labels_B, model.num_classes)])
    cond_BD = model.condition(labels_B)
    h = tokenizer.latent_size
    f_hat = jnp.zeros((B, h, h, tokenizer.quantizer.codebook.shape[1]), jnp.float32)
    cache, inputs, codes, all_logits = None, None, [], []
    for k in range(K):
        logits, cache = model.scale_step(k, inputs, cond_BD, cache)
        if guided:
            t = cfg_scale * scale_ratio(k, K)
            logits = (1 + t) * logits[:B] - t * logits[B:]
        idx_Bn = choose(k, logits)
        all_logits.append(logits)
        codes.append(idx_Bn)
        if embed is None:
            f_hat = f_hat + tokenizer.quantizer.scale_feature(idx_Bn, k)
        else:
            f_hat = f_hat + tokenizer.quantizer.embedding_feature(embed(k, logits), k)
        if k + 1 < K:
            inputs = next_input(f_hat, pns[k + 1])
            if guided:
                inputs = jnp.concatenate([inputs, inputs])
    return f_hat, codes, all_logits


def sample(model: VAR, tokenizer: VQVAE, labels_B: jax.Array, key: jax.Array, *,
           cfg_scale: float = 1.5, top_k: int = 0, top_p: float = 1.0,
           temperature: float = 1.0, more_smooth: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    """(images in [-1, 1] [B, H, W, 3], codes per scale) for the given class labels."""
    gv, pv = nnx.split(model)
    gt, pt = nnx.split(tokenizer)
    fn = _sampler(gv, gt, float(cfg_scale), int(top_k), float(top_p), float(temperature),
                  bool(more_smooth))
    return fn(pv, pt, labels_B, key)


@functools.lru_cache(maxsize=8)
def _sampler(gv, gt, cfg_scale, top_k, top_p, temperature, more_smooth):
    @jax.jit
    def run(pv, pt, labels_B, key):
        model, tokenizer = nnx.merge(gv, pv), nnx.merge(gt, pt)
        K = len(model.patch_nums)
        keys = jax.random.split(key, K)
        smooth_keys = jax.random.split(jax.random.fold_in(key, 1), K)

        def choose(k, logits):
            logits = filter_logits(logits / temperature, top_k, top_p)
            return jax.random.categorical(keys[k], logits, axis=-1).astype(jnp.int32)

        def embed(k, logits):
            logits = filter_logits(logits, top_k, top_p)
            return smooth_embedding(logits, tokenizer.quantizer.codebook[...], smooth_keys[k], k, K)

        f_hat, codes, _ = decode_scales(model, tokenizer, labels_B, choose, cfg_scale,
                                        embed if more_smooth else None)
        return jnp.clip(tokenizer.decode(f_hat), -1.0, 1.0), codes
    return run


def sampling_steps(patch_nums) -> dict[str, int]:
    """Sequential model calls per image: next-scale (one per scale) vs raster (one per token)."""
    return {'next_scale': len(patch_nums), 'raster': sum(p * p for p in patch_nums)}


def to_uint8(images_BHWC) -> np.ndarray:
    return np.round((np.asarray(images_BHWC, np.float32) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def save_grid(images_BHWC, path: str, ncol: int, upscale: int = 4) -> None:
    """A PNG grid of images in [-1, 1], row-major, each enlarged `upscale` times (nearest)."""
    from PIL import Image

    x = to_uint8(images_BHWC)
    B, H, W, C = x.shape
    nrow = -(-B // ncol)
    pad = 2
    grid = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, C), 255, np.uint8)
    for i in range(B):
        r, c = divmod(i, ncol)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = x[i]
    grid = np.repeat(np.repeat(grid, upscale, 0), upscale, 1)
    Image.fromarray(grid).save(path)


def default_out(workdir: str) -> str:
    """Where the grid goes without --out: inside the sampled run's folder."""
    return os.path.join(workdir, 'samples.png')


def describe_steps(patch_nums) -> str:
    """The sampling cost in words (model calls per image, next-scale vs raster order)."""
    steps = sampling_steps(patch_nums)
    return (f'{steps["next_scale"]} model calls per image (one per scale); a raster-order model '
            f'of the same {steps["raster"]} tokens would need {steps["raster"]}')


def main(argv) -> None:
    from absl import flags

    from model_zoo import var as var_lib
    from pretrain import logs
    from pretrain.errors import ConfigError

    logs.quiet_libraries()
    f = flags.FLAGS
    ckpt_dir = os.path.join(f.workdir, 'checkpoints')
    try:
        if not os.path.isdir(ckpt_dir):
            raise ConfigError(f'--workdir={f.workdir!r} has no checkpoints ({ckpt_dir} does not '
                              'exist); train a var (stage 2) run there first')
        model, cfg, step = var_lib.restore_model(f.workdir)
        if cfg.model.family != 'var':
            raise ConfigError(f'--workdir={f.workdir!r} is a {cfg.model.family!r} run; sampling '
                              'needs a var (stage 2) run')
        tokenizer, _ = var_lib.load_tokenizer(cfg)
    except ConfigError as e:
        raise SystemExit(f'var_sample: {e}') from None
    out = f.out or default_out(f.workdir)
    n = cfg.model.var.num_classes
    labels = jnp.repeat(jnp.arange(n, dtype=jnp.int32), f.per_class)
    images, _ = sample(model, tokenizer, labels, jax.random.PRNGKey(f.seed), cfg_scale=f.cfg_scale,
                       top_k=f.top_k, top_p=f.top_p, more_smooth=f.more_smooth)
    # One column per class: row r holds the r-th sample of every class.
    order = np.arange(n * f.per_class).reshape(n, f.per_class).T.reshape(-1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_grid(np.asarray(images)[order], out, ncol=n)
    print(f'wrote {out}: {n} classes x {f.per_class} samples from step {step}; '
          f'{describe_steps(cfg.model.var.patch_nums)}')


if __name__ == '__main__':
    from absl import app, flags

    flags.DEFINE_string('workdir', None, 'A finished var (stage 2) run.', required=True)
    flags.DEFINE_string('out', '', 'PNG grid to write (one column per class); default: '
                        'WORKDIR/samples.png.')
    flags.DEFINE_integer('per_class', 4, 'Samples per class.')
    flags.DEFINE_float('cfg_scale', 1.5, 'Classifier-free guidance at the last scale; 0 = off.')
    flags.DEFINE_integer('top_k', 0, 'Keep the k most likely codes (0 = all).')
    flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1 = off).')
    flags.DEFINE_integer('seed', 0, 'Sampling seed.')
    flags.DEFINE_bool('more_smooth', False, 'Gumbel-softmax code mixes in the image features '
                      '(smoother images; the published sampler\'s option).')
    app.run(main)
