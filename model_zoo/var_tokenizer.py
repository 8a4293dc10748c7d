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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain.data import resize
from model_zoo.family import FAMILIES, Batch, Family
from model_zoo.layers import RMSNorm, normal, param
from pretrain.errors import ConfigError, check_choice

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


def _rms_norm(channels: int, param_dtype: str, rngs: nnx.Rngs) -> nnx.Module:
    return RMSNorm(channels, eps=1e-6, param_dtype=param_dtype, rngs=rngs)


class ResBlock(nnx.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 projection when channels change.
    `norm(channels, param_dtype, rngs)`: RMSNorm here, GroupNorm in the published tokenizer."""

    def __init__(self, c_in: int, c_out: int, size: int, rngs: nnx.Rngs, param_dtype: str,
                 norm: Callable[[int, str, nnx.Rngs], nnx.Module] = _rms_norm):
        kw = dict(out_size=size, rngs=rngs, param_dtype=param_dtype)
        self.norm1 = norm(c_in, param_dtype, rngs)
        self.conv1 = Conv(c_in, c_out, role='hidden', **kw)
        self.norm2 = norm(c_out, param_dtype, rngs)
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


# ----------------------------------------------------------------------------- published layout
# VAR's released VQ-VAE (Tian et al. 2024, a taming-style CNN): GroupNorm, two residual blocks
# per level in the encoder and three in the decoder, single-head self-attention after every
# block of the lowest-resolution level and between the two middle blocks, and 3x3 convs
# between the encoder and the quantizer (quant_conv) and the quantizer and the decoder
# (post_quant_conv). Module names mirror the reference's so that the converter
# (pretrain/var_official.py) is a plain name table.

GROUPS = 32               # GroupNorm groups of the published VQ-VAE
PUBLISHED_RES_BLOCKS = 2  # per encoder level; the decoder has one more


class GroupNorm(nnx.Module):
    """GroupNorm over the channel axis (channels last), learned gain and bias, in float32."""

    def __init__(self, channels: int, param_dtype: str, rngs: nnx.Rngs, groups: int = GROUPS,
                 eps: float = 1e-6):
        self.groups, self.eps = groups, eps
        self.scale = param(rngs, lambda key, s, d: jnp.ones(s, d), (channels,), (None,), 'vector',
                           param_dtype)
        self.bias = param(rngs, lambda key, s, d: jnp.zeros(s, d), (channels,), (None,), 'vector',
                          param_dtype)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        x = x_BHWC.astype(jnp.float32).reshape(B, H, W, self.groups, C // self.groups)
        mu = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean((x - mu) ** 2, axis=(1, 2, 4), keepdims=True)
        y = ((x - mu) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (y * self.scale[...] + self.bias[...]).astype(x_BHWC.dtype)


class SpatialAttention(nnx.Module):
    """x + proj(attention over the h*w positions), one head of width C, 1x1 convs for q, k, v."""

    def __init__(self, channels: int, size: int, rngs: nnx.Rngs, param_dtype: str):
        kw = dict(out_size=size, rngs=rngs, param_dtype=param_dtype, k=1, role='hidden')
        self.norm = GroupNorm(channels, param_dtype, rngs)
        self.qkv = Conv(channels, 3 * channels, **kw)
        self.proj = Conv(channels, channels, **kw)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        q_BNC, k_BNC, v_BNC = jnp.split(self.qkv(self.norm(x_BHWC)).reshape(B, H * W, 3 * C), 3, -1)
        logits_BNM = jnp.einsum('bnc,bmc->bnm', q_BNC, k_BNC, precision=_HIGHEST) * C ** -0.5
        probs_BNM = jax.nn.softmax(logits_BNM.astype(jnp.float32), axis=-1).astype(v_BNC.dtype)
        h_BNC = jnp.einsum('bnm,bmc->bnc', probs_BNM, v_BNC, precision=_HIGHEST)
        return x_BHWC + self.proj(h_BNC.reshape(B, H, W, C))


class Level(nnx.Module):
    """One resolution level: residual blocks, each followed by attention where `attention`,
    then an optional resampling conv (stride-2 down, or nearest 2x up then conv)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, size: int, attention: bool,
                 resample: str | None, rngs: nnx.Rngs, param_dtype: str):
        blocks, attns = [], []
        for _ in range(n_blocks):
            blocks.append(ResBlock(c_in, c_out, size, rngs, param_dtype, norm=GroupNorm))
            c_in = c_out
            if attention:
                attns.append(SpatialAttention(c_out, size, rngs, param_dtype))
        self.blocks, self.attns = nnx.List(blocks), nnx.List(attns)
        self.up = resample == 'up'
        out = size // 2 if resample == 'down' else size * 2
        self.resample = None if resample is None else Conv(
            c_out, c_out, stride=2 if resample == 'down' else 1, out_size=out, role='hidden',
            rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for i, block in enumerate(self.blocks):
            x_BHWC = block(x_BHWC)
            if len(self.attns):
                x_BHWC = self.attns[i](x_BHWC)
        if self.resample is None:
            return x_BHWC
        if self.up:
            x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        # A stride-2 'SAME' conv of an even size pads one zero row and column after the image,
        # which is the reference's pad-(0, 1)-then-valid downsampling.
        return self.resample(x_BHWC)


class Middle(nnx.Module):
    """block_1, attention, block_2 at the lowest resolution."""

    def __init__(self, channels: int, size: int, rngs: nnx.Rngs, param_dtype: str):
        self.block_1 = ResBlock(channels, channels, size, rngs, param_dtype, norm=GroupNorm)
        self.attn_1 = SpatialAttention(channels, size, rngs, param_dtype)
        self.block_2 = ResBlock(channels, channels, size, rngs, param_dtype, norm=GroupNorm)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x_BHWC)))


class PublishedEncoder(nnx.Module):
    """Image [B, H, W, 3] -> quant_conv(encoder) [B, h, w, Cvae], the reference's layout."""

    def __init__(self, v, image_size: int, rngs: nnx.Rngs, param_dtype: str):
        widths, size, n = _widths(v), image_size, len(v.channel_mult)
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.conv_in = Conv(IMAGE_CHANNELS, widths[0], out_size=size, role='embedding', **kw)
        levels = []
        for i, w in enumerate(widths):
            last = i == n - 1
            levels.append(Level(widths[max(i - 1, 0)], w, PUBLISHED_RES_BLOCKS, size, last,
                                None if last else 'down', **kw))
            size = size if last else size // 2
        self.levels = nnx.List(levels)
        self.mid = Middle(widths[-1], size, **kw)
        self.norm_out = GroupNorm(widths[-1], param_dtype, rngs)
        self.conv_out = Conv(widths[-1], v.latent_channels, out_size=size, role='hidden', **kw)
        self.quant_conv = Conv(v.latent_channels, v.latent_channels, out_size=size, role='hidden',
                               **kw)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x = self.conv_in(x_BHWC)
        for level in self.levels:
            x = level(x)
        x = self.conv_out(jax.nn.silu(self.norm_out(self.mid(x))))
        return self.quant_conv(x)


class PublishedDecoder(nnx.Module):
    """post_quant_conv, then the reference's decoder: feature [B, h, w, Cvae] -> image.

    `levels[i]` is the reference's `up[i]` (i = 0 is the full resolution), so they run in
    reverse order.
    """

    def __init__(self, v, image_size: int, rngs: nnx.Rngs, param_dtype: str):
        widths, n = _widths(v), len(v.channel_mult)
        size = image_size // 2 ** (n - 1)
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.post_quant_conv = Conv(v.latent_channels, v.latent_channels, out_size=size,
                                    role='hidden', **kw)
        self.conv_in = Conv(v.latent_channels, widths[-1], out_size=size, role='hidden', **kw)
        self.mid = Middle(widths[-1], size, **kw)
        levels, c_in = [None] * n, widths[-1]
        for i in reversed(range(n)):
            levels[i] = Level(c_in, widths[i], PUBLISHED_RES_BLOCKS + 1, size, i == n - 1,
                              'up' if i else None, **kw)
            c_in, size = widths[i], size * 2 if i else size
        self.levels = nnx.List(levels)
        self.norm_out = GroupNorm(widths[0], param_dtype, rngs)
        self.conv_out = Conv(widths[0], IMAGE_CHANNELS, out_size=size, role='readout', **kw)

    def __call__(self, f_BhwC: jax.Array) -> jax.Array:
        x = self.mid(self.conv_in(self.post_quant_conv(f_BhwC)))
        for level in reversed(self.levels):
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


PHI_RULES = ('simple', 'published')
TOKENIZER_ARCHS = ('simple', 'published')


def phi_index(k: int, n_scales: int, n_phi: int, rule: str = 'simple') -> int:
    """Which shared phi conv scale k uses.

    'simple': the scales spread evenly over the convs, round(k / (S - 1) * (n_phi - 1)).
    'published': VAR's rule, the conv whose tick is nearest to k / (S - 1), the ticks
    linspace(a, 1 - a, n_phi) with a = 1/(3 n_phi) for 4 convs (the released tokenizer) and
    1/(2 n_phi) for any other count. Computed in float64 the same way as the reference,
    because some scales lie exactly half-way between two ticks and the rounding of the ticks
    decides them (scale 7 of 10 with 4 convs: phi 3, where 'simple' gives phi 2).
    """
    if n_scales == 1:
        return 0
    if rule == 'simple':
        return round(k / (n_scales - 1) * (n_phi - 1))
    margin = 1 / 3 / n_phi if n_phi == 4 else 1 / 2 / n_phi
    ticks = np.linspace(margin, 1 - margin, n_phi)
    return int(np.argmin(np.abs(ticks - k / (n_scales - 1))))


class Quantizer(nnx.Module):
    """Multi-scale residual quantizer: one codebook shared by all scales, n_phi shared convs."""

    def __init__(self, v, latent_size: int, rngs: nnx.Rngs, param_dtype: str):
        self.patch_nums = tuple(int(p) for p in v.patch_nums)
        self.latent_size, self.beta, self.phi_ratio = latent_size, v.beta, v.phi_ratio
        self.phi_rule = v.get('phi_rule', 'simple')
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
        return self.embedding_feature(jnp.take(self.codebook[...], idx_BN, axis=0), k)

    def embedding_feature(self, e_BNC: jax.Array, k: int) -> jax.Array:
        """h_k from scale k's code vectors [B, pn*pn, C] (looked up, or a soft mix of codes)."""
        pn = self.patch_nums[k]
        e_BppC = e_BNC.reshape(e_BNC.shape[0], pn, pn, -1)
        up_BhwC = resize.resize(e_BppC, self.latent_size, 'bicubic')
        conv = self.phi[phi_index(k, len(self.patch_nums), len(self.phi), self.phi_rule)]
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
        published = v.get('tokenizer_arch', 'simple') == 'published'
        self.encoder = (PublishedEncoder if published else Encoder)(v, image_size, rngs, pd)
        self.quantizer = Quantizer(v, self.latent_size, rngs, pd)
        self.decoder = (PublishedDecoder if published else Decoder)(v, image_size, rngs, pd)

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
    check_choice('model.var.phi_rule', v.phi_rule, PHI_RULES)
    check_choice('model.var.tokenizer_arch', v.tokenizer_arch, TOKENIZER_ARCHS)
    if v.tokenizer_arch == 'published':
        for width in sorted(set(_widths(v))):
            if width % GROUPS:
                raise ConfigError(
                    f"model.var.tokenizer_arch='published': every width model.var.base_channels "
                    f'x channel_mult must be a multiple of the {GROUPS} GroupNorm groups, '
                    f'{width} (base_channels={v.base_channels}, channel_mult='
                    f'{tuple(v.channel_mult)!r}) is not')
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
        arch='simple',             # stage-2 block: 'simple' or 'published' (VAR's, holds its weights)
        phi_rule='simple',         # which phi conv a scale uses: 'simple' or 'published' (VAR's)
        tokenizer_arch='simple',   # stage-1 CNN: 'simple' or 'published' (VAR's VQ-VAE layout)
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

