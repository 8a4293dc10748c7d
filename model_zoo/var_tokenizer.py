"""VAR stage 1: a CNN VQ-VAE whose latent is quantized residually over several scales.

Quantization (for each scale pn in patch_nums, coarse to fine):
    z_k = area(f_rest, pn); idx_k = nearest code; h_k = phi_k(bicubic(E[idx_k], latent));
    f_hat += h_k; f_rest -= h_k
so the scales' h_k sum to the reconstructed feature f_hat. The decoder sees
f + sg(f_hat - f) (straight-through). VQ loss per scale, averaged over scales:
beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2. Dead codes: every code unused in a batch
is pulled towards its nearest encoder feature there, so it drifts back into use.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain.data import resize
from model_zoo.family import FAMILIES, Batch, Family
from model_zoo.layers import RMSNorm, normal, param
from pretrain.errors import ConfigError

IMAGE_CHANNELS = 3
_HIGHEST = jax.lax.Precision.HIGHEST


class Conv(nnx.Module):
    """k x k convolution, channels last, 'SAME' padding; `out_size` is kept for FLOP counts."""

    def __init__(self, c_in: int, c_out: int, *, out_size: int, role: str, rngs: nnx.Rngs,
                 k: int = 3, stride: int = 1, param_dtype: str = 'float32'):
        self.stride, self.k, self.out_size = stride, k, out_size
        std = 1.0 / math.sqrt(k * k * c_in)   # unit-variance outputs for unit-variance inputs
        self.kernel = param(rngs, normal(std), (k, k, c_in, c_out), (None, None, None, None),
                            role, param_dtype)
        self.bias = param(rngs, lambda key, s, d: jnp.zeros(s, d), (c_out,), (None,), 'vector',
                          param_dtype)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x_BHWC, self.kernel[...], (self.stride, self.stride), 'SAME',
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
        return y + self.bias[...]


class ResBlock(nnx.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 projection when channels change."""

    def __init__(self, c_in: int, c_out: int, size: int, rngs: nnx.Rngs, param_dtype: str):
        kw = dict(out_size=size, rngs=rngs, param_dtype=param_dtype)
        self.norm1 = RMSNorm(c_in, eps=1e-6, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv(c_in, c_out, role='hidden', **kw)
        self.norm2 = RMSNorm(c_out, eps=1e-6, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = Conv(c_out, c_out, role='hidden', **kw)
        self.skip = Conv(c_in, c_out, k=1, role='hidden', **kw) if c_in != c_out else None

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x_BHWC if self.skip is None else self.skip(x_BHWC)) + h


def _widths(v) -> list[int]:
    return [v.base_channels * m for m in v.channel_mult]


class Encoder(nnx.Module):
    """Image [B, H, W, 3] -> feature [B, h, w, Cvae], halving the size len(channel_mult)-1 times."""

    def __init__(self, v, image_size: int, rngs: nnx.Rngs, param_dtype: str):
        widths, size = _widths(v), image_size
        self.conv_in = Conv(IMAGE_CHANNELS, widths[0], out_size=size, role='embedding', rngs=rngs,
                            param_dtype=param_dtype)
        blocks, downs = [], []
        for i, w in enumerate(widths):
            blocks.append(ResBlock(widths[max(i - 1, 0)], w, size, rngs, param_dtype))
            if i < len(widths) - 1:
                size //= 2
                downs.append(Conv(w, w, stride=2, out_size=size, role='hidden', rngs=rngs,
                                  param_dtype=param_dtype))
        self.blocks, self.downs = nnx.List(blocks), nnx.List(downs)
        self.mid = ResBlock(widths[-1], widths[-1], size, rngs, param_dtype)
        self.norm_out = RMSNorm(widths[-1], eps=1e-6, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = Conv(widths[-1], v.latent_channels, out_size=size, role='hidden',
                             rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x = self.conv_in(x_BHWC)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.downs):
                x = self.downs[i](x)
        return self.conv_out(jax.nn.silu(self.norm_out(self.mid(x))))


class Decoder(nnx.Module):
    """Feature [B, h, w, Cvae] -> image [B, H, W, 3]: the encoder mirrored, nearest upsampling."""

    def __init__(self, v, image_size: int, rngs: nnx.Rngs, param_dtype: str):
        widths = _widths(v)[::-1]
        size = image_size // 2 ** (len(widths) - 1)
        self.conv_in = Conv(v.latent_channels, widths[0], out_size=size, role='hidden', rngs=rngs,
                            param_dtype=param_dtype)
        self.mid = ResBlock(widths[0], widths[0], size, rngs, param_dtype)
        blocks, ups = [], []
        for i, w in enumerate(widths):
            blocks.append(ResBlock(widths[max(i - 1, 0)], w, size, rngs, param_dtype))
            if i < len(widths) - 1:
                size *= 2
                ups.append(Conv(w, w, out_size=size, role='hidden', rngs=rngs,
                                param_dtype=param_dtype))
        self.blocks, self.ups = nnx.List(blocks), nnx.List(ups)
        self.norm_out = RMSNorm(widths[-1], eps=1e-6, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = Conv(widths[-1], IMAGE_CHANNELS, out_size=size, role='readout', rngs=rngs,
                             param_dtype=param_dtype)

    def __call__(self, f_BhwC: jax.Array) -> jax.Array:
        x = self.mid(self.conv_in(f_BhwC))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.ups):
                x = self.ups[i](jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


def phi_index(k: int, n_scales: int, n_phi: int) -> int:
    """Which shared phi conv scale k uses: scales spread evenly over the n_phi convs."""
    return 0 if n_scales == 1 else round(k / (n_scales - 1) * (n_phi - 1))


class Quantizer(nnx.Module):
    """Multi-scale residual quantizer: one codebook shared by all scales, n_phi shared convs."""

    def __init__(self, v, latent_size: int, rngs: nnx.Rngs, param_dtype: str):
        self.patch_nums = tuple(int(p) for p in v.patch_nums)
        self.latent_size, self.beta, self.phi_ratio = latent_size, v.beta, v.phi_ratio
        C = v.latent_channels
        self.codebook = param(rngs, normal(1.0 / v.codebook_size), (v.codebook_size, C),
                              (None, None), 'embedding', param_dtype)
        self.phi = nnx.List([Conv(C, C, out_size=latent_size, role='hidden', rngs=rngs,
                                  param_dtype=param_dtype) for _ in range(v.n_phi)])

    def nearest(self, z_BNC: jax.Array) -> jax.Array:
        """Index of the nearest code (squared L2) for every vector."""
        E_VC = self.codebook[...]
        d_BNV = (jnp.sum(z_BNC ** 2, -1, keepdims=True) - 2 * jnp.einsum(
            'bnc,vc->bnv', z_BNC, E_VC, precision=_HIGHEST) + jnp.sum(E_VC ** 2, -1))
        return jnp.argmin(d_BNV, axis=-1).astype(jnp.int32)

    def scale_feature(self, idx_BN: jax.Array, k: int) -> jax.Array:
        """h_k: scale k's codes [B, pn*pn] looked up, upsampled to the latent and refined by phi."""
        pn = self.patch_nums[k]
        e_BppC = jnp.take(self.codebook[...], idx_BN, axis=0).reshape(idx_BN.shape[0], pn, pn, -1)
        up_BhwC = resize.resize(e_BppC, self.latent_size, 'bicubic')
        conv = self.phi[phi_index(k, len(self.patch_nums), len(self.phi))]
        return (1 - self.phi_ratio) * up_BhwC + self.phi_ratio * conv(up_BhwC)

    def __call__(self, f_BhwC: jax.Array):
        """(f_hat, [idx_k of shape [B, pn_k^2]], per-scale z_k targets [B, L, C], vq loss)."""
        f_sg = jax.lax.stop_gradient(f_BhwC)
        f_rest, f_hat = f_sg, jnp.zeros_like(f_sg)
        codes, targets, vq_loss = [], [], 0.0
        B, C = f_sg.shape[0], f_sg.shape[-1]
        for k, pn in enumerate(self.patch_nums):
            z_BNC = resize.resize(f_rest, pn, 'area').reshape(B, pn * pn, C)
            idx_BN = self.nearest(z_BNC)
            h_BhwC = self.scale_feature(idx_BN, k)
            f_hat = f_hat + h_BhwC
            f_rest = f_rest - jax.lax.stop_gradient(h_BhwC)
            vq_loss += (self.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f_BhwC) ** 2)
                        + jnp.mean((f_hat - f_sg) ** 2))
            codes.append(idx_BN)
            targets.append(z_BNC)
        return f_hat, codes, jnp.concatenate(targets, axis=1), vq_loss / len(self.patch_nums)


class VQVAE(nnx.Module):
    """Encoder, multi-scale residual quantizer, decoder."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        v, image_size = cfg.model.var, cfg.data.image.image_size
        pd = cfg.model.param_dtype
        self.latent_size = latent_size(cfg)
        self.dead_code_weight = v.dead_code_weight
        self.encoder = Encoder(v, image_size, rngs, pd)
        self.quantizer = Quantizer(v, self.latent_size, rngs, pd)
        self.decoder = Decoder(v, image_size, rngs, pd)

    def encode(self, images_BHWC: jax.Array) -> list[jax.Array]:
        """Per-scale code indices [B, pn_k^2] of images in [-1, 1]."""
        return self.quantizer(self.encoder(images_BHWC))[1]

    def codes_to_features(self, codes: list[jax.Array]) -> list[jax.Array]:
        """The accumulated f_hat after each scale (the last one is the decoder's input)."""
        out, f_hat = [], 0.0
        for k, idx_BN in enumerate(codes):
            f_hat = f_hat + self.quantizer.scale_feature(idx_BN, k)
            out.append(f_hat)
        return out

    def teacher_inputs(self, codes: list[jax.Array]) -> jax.Array:
        """Stage-2 inputs for scales 2..K: area(f_hat after scale k-1, pn_k), [B, L - pn_1^2, C]."""
        pns = self.quantizer.patch_nums
        feats = self.codes_to_features(codes[:-1])
        B = codes[0].shape[0]
        return jnp.concatenate([next_input(f, pn) for f, pn in zip(feats, pns[1:])], axis=1) \
            if feats else jnp.zeros((B, 0, self.quantizer.codebook.shape[1]))

    def decode(self, f_hat_BhwC: jax.Array) -> jax.Array:
        return self.decoder(f_hat_BhwC)


def next_input(f_hat_BhwC: jax.Array, pn: int) -> jax.Array:
    """The next scale's stage-2 input tokens [B, pn*pn, C] from the accumulated feature."""
    B, C = f_hat_BhwC.shape[0], f_hat_BhwC.shape[-1]
    return resize.resize(f_hat_BhwC, pn, 'area').reshape(B, pn * pn, C)


def usage_metrics(codes: list[jax.Array], codebook_size: int) -> dict[str, jax.Array]:
    """Codebook perplexity and the number of codes unused in this batch (all scales)."""
    idx = jnp.concatenate([c.reshape(-1) for c in codes])
    p_V = jnp.bincount(idx, length=codebook_size) / idx.size
    entropy = -jnp.sum(jnp.where(p_V > 0, p_V * jnp.log(jnp.where(p_V > 0, p_V, 1.0)), 0.0))
    return {'perplexity': jnp.exp(entropy), 'dead_codes': jnp.sum(p_V == 0).astype(jnp.float32)}


def dead_code_pull(codebook_VC: jax.Array, targets_BNC: jax.Array,
                   codes: list[jax.Array]) -> jax.Array:
    """Mean over the codes unused in this batch of the squared distance to the nearest batch
    feature (stop-gradient). Used codes are left to the VQ loss: pulling them too would crowd
    them onto the densest features (measured: fewer codes in use, see docs/var.md)."""
    z_NC = jax.lax.stop_gradient(targets_BNC.reshape(-1, targets_BNC.shape[-1]))
    d_VN = (jnp.sum(codebook_VC ** 2, -1)[:, None] - 2 * jnp.einsum(
        'vc,nc->vn', codebook_VC, z_NC, precision=_HIGHEST) + jnp.sum(z_NC ** 2, -1)[None, :])
    idx = jnp.concatenate([c.reshape(-1) for c in codes])
    dead_V = (jnp.bincount(idx, length=codebook_VC.shape[0]) == 0).astype(d_VN.dtype)
    return jnp.sum(dead_V * jnp.min(d_VN, axis=1)) / jnp.maximum(jnp.sum(dead_V), 1.0)


def tokenizer_loss(model: VQVAE, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstruction (MSE) + VQ loss + dead-code pull; codebook usage as metrics."""
    images = batch['images']
    f_BhwC = model.encoder(images)
    f_hat, codes, targets, vq_loss = model.quantizer(f_BhwC)
    f_st = f_BhwC + jax.lax.stop_gradient(f_hat - f_BhwC)   # straight-through
    rec_loss = jnp.mean((model.decoder(f_st) - images) ** 2)
    codebook_VC = model.quantizer.codebook[...]
    pull = dead_code_pull(codebook_VC, targets, codes)
    loss = rec_loss + vq_loss + model.dead_code_weight * pull
    return loss, {'loss': loss, 'rec_loss': rec_loss, 'vq_loss': vq_loss, 'code_pull': pull,
                  **usage_metrics(codes, codebook_VC.shape[0])}


def latent_size(cfg) -> int:
    return cfg.data.image.image_size // 2 ** (len(cfg.model.var.channel_mult) - 1)


def check_config(cfg, axes: dict[str, int]) -> None:
    """Checks shared by both VAR stages; each message names the key, the value and the rule."""
    v, size = cfg.model.var, cfg.data.image.image_size
    pns = tuple(v.patch_nums)
    if axes.get('sequence', 1) != 1:
        raise ConfigError(f"mesh sequence axis size {axes['sequence']}: the image families shard "
                          'only the batch (and the tensor axis); use sequence=1')
    if not pns or any(not isinstance(p, int) or p < 1 for p in pns) or list(pns) != sorted(set(pns)):
        raise ConfigError(f'model.var.patch_nums={pns!r} must be strictly increasing positive '
                          'integers (coarse to fine)')
    if not v.channel_mult or any(m < 1 for m in v.channel_mult):
        raise ConfigError(f'model.var.channel_mult={tuple(v.channel_mult)!r} must be positive '
                          'integers, one per resolution level')
    halvings = len(v.channel_mult) - 1
    if not isinstance(size, int) or size < 1 or size % 2 ** halvings:
        raise ConfigError(
            f'data.image.image_size={size!r} cannot be downsampled by the encoder: '
            f'model.var.channel_mult={tuple(v.channel_mult)!r} halves it {halvings} times, so it '
            f'must be a positive multiple of {2 ** halvings}')
    latent = latent_size(cfg)
    if pns[-1] != latent:
        raise ConfigError(
            f'model.var.patch_nums={pns!r} must end at the latent size {latent} (image_size '
            f'{size} / 2^{halvings}); the last scale is the full-resolution latent')
    for key, minimum in (('codebook_size', 2), ('latent_channels', 1), ('base_channels', 1),
                         ('n_phi', 1), ('num_classes', 1)):
        if not isinstance(v[key], int) or v[key] < minimum:
            raise ConfigError(f'model.var.{key}={v[key]!r} must be an integer >= {minimum}')
    if not 0.0 <= v.phi_ratio <= 1.0:
        raise ConfigError(f'model.var.phi_ratio={v.phi_ratio!r} must be in [0, 1]')
    if not 0.0 <= v.cond_dropout < 1.0:
        raise ConfigError(f'model.var.cond_dropout={v.cond_dropout!r} must be in [0, 1)')


def conv_flops(model: nnx.Module) -> float:
    """Training FLOPs of every Conv in `model` for one example: 3 x (2 MACs) x positions."""
    total = 0.0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Conv):
            k, _, c_in, c_out = node.kernel.shape
            total += 6.0 * k * k * c_in * c_out * node.out_size ** 2
    return total


def _flops(cfg) -> float:
    return conv_flops(nnx.eval_shape(lambda: VQVAE(cfg, nnx.Rngs(0))))


def example_spec(cfg) -> dict[str, jax.ShapeDtypeStruct]:
    s = cfg.data.image.image_size
    return {'images': jax.ShapeDtypeStruct((s, s, IMAGE_CHANNELS), jnp.float32),
            'labels': jax.ShapeDtypeStruct((), jnp.int32),
            'u': jax.ShapeDtypeStruct((), jnp.float32)}


def default_config() -> dict[str, dict]:
    """model.var, shared by both VAR stages: the next-scale transformer's width, depth and heads
    are model.d_model / n_layers / n_heads (configs use the depth rule d_model = 64 x depth,
    n_heads = depth); stage 2's tokenizer keys must match stage 1's."""
    return {'var': dict(
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
    )}


FAMILIES.register('var_tokenizer')(Family(
    build=lambda cfg, rngs, parametrization: VQVAE(cfg, rngs),
    loss=tokenizer_loss,
    flops_per_example=_flops,
    tokens_per_example=lambda cfg: latent_size(cfg) ** 2,
    validate=check_config,
    default_config=default_config,
    data='image',
    example_spec=example_spec,
))

