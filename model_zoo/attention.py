"""Attention kernels behind `model.attention_impl` (the choices are pretrain.config.ATTENTION_IMPLS).

Every kernel maps q [B, L, H, K], k and v [B, M, G, K] (G kv heads shared by R = H / G query
heads each) to the output [B, L, H, K]; logits are scaled by `scale` and softmaxed in float32.
The mask is a static, nondecreasing integer `order` per position: query l sees key m iff
order[m] <= order[l]. Causal attention is order = arange(L); VAR's block-causal mask is the
scale index of each token. A nondecreasing order makes the keys a block of queries can see a
prefix of the key blocks, which is what lets `blockwise` and `splash` skip the rest.

- `xla`: dense einsums in a 4-D [B, H, L, M] layout (kv heads repeated for GQA).
- `dot_product`: `jax.nn.dot_product_attention`; cuDNN flash attention on an NVIDIA GPU for
  bfloat16/float16 inputs, XLA's dense path otherwise.
- `blockwise`: flash attention in plain JAX (online softmax over key blocks, blocks that the
  mask hides skipped, a custom VJP that recomputes each block's probabilities): O(L x block)
  memory instead of O(L^2).
- `splash`: the Pallas TPU splash-attention kernel that ships with JAX. Fast on TPU only; on
  other backends it runs in Pallas interpret mode (correct, very slow: for tests).

The last three run per shard (`shard_map`): queries keep their batch, head and sequence shards,
keys and values are gathered over the sequence axis, so sequence parallelism stays exact.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pretrain.config import ATTENTION_IMPLS
from pretrain.mesh import logical_to_spec

NEG = float(jnp.finfo(jnp.float32).min)   # masked logit (finite: a masked row cannot give NaN)
PAD_ORDER = int(np.iinfo(np.int32).max)   # padded keys are hidden from every real query


def platform() -> str:
    """The platform the step is compiled for: the current mesh's devices (abstract TPU chips
    when compiling ahead of time from a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def causal_order(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.int32)


def visible(q_order: jax.Array, k_order: jax.Array) -> jax.Array:
    """[Lq, Mk] bool mask of an order pair."""
    return k_order[None, :] <= q_order[:, None]


def repeat_kv(x_BMGK: jax.Array, n_heads: int) -> jax.Array:
    """GQA keys/values as one per query head (head h uses kv head h // R, as reshape(G, R))."""
    G = x_BMGK.shape[2]
    return x_BMGK if G == n_heads else jnp.repeat(x_BMGK, n_heads // G, axis=2)


def logits(q_BLHK: jax.Array, k_BMGK: jax.Array, scale: float) -> jax.Array:
    """Scaled pre-softmax logits [B, H, L, M] in float32 (before any mask)."""
    return _logits(_heads_major(q_BLHK), _heads_major(repeat_kv(k_BMGK, q_BLHK.shape[2])), scale)


def _heads_major(x_BLHK: jax.Array) -> jax.Array:
    return x_BLHK.transpose(0, 2, 1, 3)


def _logits(q_BHLK, k_BHMK, scale):
    # Batch dims (b, h) leading on both sides: one plain batched matmul, no transposes of the
    # L x M scores. The earlier 5-D GQA einsum ('blgrk,bmgk->bgrlm') moved the scores between
    # layouts, 1.6-1.7x slower fwd+bwd at L = 1024.
    return jnp.einsum('bhlk,bhmk->bhlm', q_BHLK, k_BHMK.astype(q_BHLK.dtype),
                      preferred_element_type=jnp.float32) * scale


def dense(q_BLHK: jax.Array, k_BMGK: jax.Array, v_BMGK: jax.Array, mask_LM, scale: float) -> jax.Array:
    """Materialised attention; `mask_LM` is a [L, M] bool array or None (everything visible)."""
    dt = q_BLHK.dtype
    H = q_BLHK.shape[2]
    logits_BHLM = _logits(_heads_major(q_BLHK), _heads_major(repeat_kv(k_BMGK, H)), scale)
    if mask_LM is not None:
        logits_BHLM = jnp.where(mask_LM, logits_BHLM, NEG)
    probs_BHLM = jax.nn.softmax(logits_BHLM, axis=-1).astype(dt)
    v_BHMK = _heads_major(repeat_kv(v_BMGK, H)).astype(dt)
    return _heads_major(jnp.einsum('bhlm,bhmk->bhlk', probs_BHLM, v_BHMK))


def attend(q_BLHK: jax.Array, k_BMGK: jax.Array, v_BMGK: jax.Array, order_L: np.ndarray, *,
           impl: str, scale: float, block_size: int = 512) -> jax.Array:
    """Self-attention of L tokens under the mask `order_L` (static numpy) with kernel `impl`."""
    order_L = np.asarray(order_L, np.int32)
    if impl == 'xla':
        order = jnp.asarray(order_L)   # the [L, L] mask is built in the graph, not a constant
        return dense(q_BLHK, k_BMGK, v_BMGK, visible(order, order), scale)
    if impl == 'dot_product':
        causal = bool((order_L == causal_order(len(order_L))).all())
        kernel = functools.partial(_dot_product, scale=scale, causal=causal)
        return _per_shard(kernel, q_BLHK, k_BMGK, v_BMGK, order_L)
    if impl == 'blockwise':
        kernel = functools.partial(_blockwise_shard, scale=scale, block_size=block_size)
        return _per_shard(kernel, q_BLHK, k_BMGK, v_BMGK, order_L)
    if impl == 'splash':
        return _splash(q_BLHK, k_BMGK, v_BMGK, order_L, scale, block_size)
    raise ValueError(f'attention impl {impl!r} is not one of {ATTENTION_IMPLS}')


# ----------------------------------------------------------------------------- per shard

def _specs():
    """Specs of q [B, L, H, K] (sequence-sharded) and k, v [B, M, G, K] (whole sequence)."""
    batch, length, heads = logical_to_spec(('act_batch', 'act_length', 'act_heads'))
    # Separate lookups: in one spec the second of heads / kv_heads would lose 'tensor'.
    kv_heads = logical_to_spec(('act_batch', None, 'act_kv_heads'))[2]
    # A sharded head dim would split the contraction: kernels need it whole.
    return P(batch, length, heads, None), P(batch, None, kv_heads, None), length


def _per_shard(kernel, q_BLHK, k_BMGK, v_BMGK, order_L):
    """kernel(q, k, v, q_order, k_order) on each device's queries against all keys."""
    order = jnp.asarray(order_L)
    if jax.sharding.get_abstract_mesh().empty:
        return kernel(q_BLHK, k_BMGK, v_BMGK, order, order)
    q_spec, kv_spec, length = _specs()
    # check_vma=False: custom VJPs and Pallas calls carry no varying-axis types; the keys' and
    # values' cotangents, one per query shard, are then summed over the sequence axis by
    # shard_map's transpose (tests/test_attention.py checks the gradients).
    return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, P(length), P()),
                         out_specs=q_spec, check_vma=False)(q_BLHK, k_BMGK, v_BMGK, order, order)


# ----------------------------------------------------------------------------- dot_product

def _dot_product(q_BLHK, k_BMGK, v_BMGK, q_order, k_order, *, scale: float, causal: bool):
    # cuDNN takes half precision only; elsewhere jax picks its XLA path.
    on_gpu = platform() == 'gpu' and q_BLHK.dtype in (jnp.bfloat16, jnp.float16)
    implementation = 'cudnn' if on_gpu else None
    dt = q_BLHK.dtype
    k_BMGK, v_BMGK = k_BMGK.astype(dt), v_BMGK.astype(dt)
    if causal and q_BLHK.shape[1] == k_BMGK.shape[1]:   # unsharded queries: cuDNN's own mask
        return jax.nn.dot_product_attention(q_BLHK, k_BMGK, v_BMGK, scale=scale, is_causal=True,
                                            implementation=implementation)
    mask_11LM = visible(q_order, k_order)[None, None]
    return jax.nn.dot_product_attention(q_BLHK, k_BMGK, v_BMGK, mask=mask_11LM, scale=scale,
                                        implementation=implementation)


# ----------------------------------------------------------------------------- blockwise

def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blockwise_shard(q_BLHK, k_BMGK, v_BMGK, q_order, k_order, *, scale: float, block_size: int):
    L, H = q_BLHK.shape[1], q_BLHK.shape[2]
    bq, bk = min(block_size, L), min(block_size, k_BMGK.shape[1])
    q_BHLK = _pad_to(q_BLHK, 1, bq).transpose(0, 2, 1, 3)
    k_BHMK = _pad_to(repeat_kv(k_BMGK, H), 1, bk).transpose(0, 2, 1, 3).astype(q_BLHK.dtype)
    v_BHMK = _pad_to(repeat_kv(v_BMGK, H), 1, bk).transpose(0, 2, 1, 3).astype(q_BLHK.dtype)
    # Padded queries see every key (no empty rows); padded keys are seen by no real query.
    q_order = _pad_to(q_order, 0, bq, PAD_ORDER)
    k_order = _pad_to(k_order, 0, bk, PAD_ORDER)
    out_BHLK = blockwise(q_BHLK, k_BHMK, v_BHMK, q_order, k_order, scale, bq, bk)
    return out_BHLK[:, :, :L].transpose(0, 2, 1, 3)


def _key_blocks_needed(q_order_NqBq, k_order, bk):
    """Per query block, how many leading key blocks it sees (the rest are fully masked)."""
    first_key_order = k_order[::bk]
    return jnp.sum(first_key_order[None, :] <= q_order_NqBq[:, -1:], axis=1)


def _block_logits(q_BHQK, k_BHMK, qo_Q, ko_M, scale):
    s_BHQM = jnp.einsum('bhqk,bhmk->bhqm', q_BHQK, k_BHMK,
                        preferred_element_type=jnp.float32) * scale
    return jnp.where(visible(qo_Q, ko_M), s_BHQM, NEG)


def _blockwise_forward(q_BHLK, k_BHMK, v_BHMK, q_order, k_order, scale, bq, bk):
    """(out [B, H, L, K], logsumexp [B, H, L] float32), one query block at a time."""
    B, H, L, K = q_BHLK.shape
    dt = q_BHLK.dtype
    q_NBHQK = q_BHLK.reshape(B, H, L // bq, bq, K).transpose(2, 0, 1, 3, 4)
    q_order_NQ = q_order.reshape(L // bq, bq)
    needed_N = _key_blocks_needed(q_order_NQ, k_order, bk)

    def query_block(args):
        q_BHQK, qo_Q, needed = args

        def key_block(j, carry):
            m_BHQ, l_BHQ, acc_BHQK = carry
            k_BHMK_j = jax.lax.dynamic_slice_in_dim(k_BHMK, j * bk, bk, axis=2)
            v_BHMK_j = jax.lax.dynamic_slice_in_dim(v_BHMK, j * bk, bk, axis=2)
            ko_M = jax.lax.dynamic_slice_in_dim(k_order, j * bk, bk)
            s_BHQM = _block_logits(q_BHQK, k_BHMK_j, qo_Q, ko_M, scale)
            m_new = jnp.maximum(m_BHQ, s_BHQM.max(-1))
            p_BHQM = jnp.exp(s_BHQM - m_new[..., None])
            alpha = jnp.exp(m_BHQ - m_new)
            acc_BHQK = acc_BHQK * alpha[..., None] + jnp.einsum(
                'bhqm,bhmk->bhqk', p_BHQM.astype(dt), v_BHMK_j, preferred_element_type=jnp.float32)
            return m_new, l_BHQ * alpha + p_BHQM.sum(-1), acc_BHQK

        # Key block 0 holds the smallest order, visible to every query: m is finite after it.
        init = (jnp.full((B, H, bq), -jnp.inf, jnp.float32), jnp.zeros((B, H, bq), jnp.float32),
                jnp.zeros((B, H, bq, K), jnp.float32))
        m_BHQ, l_BHQ, acc_BHQK = jax.lax.fori_loop(0, needed, key_block, init)
        return (acc_BHQK / l_BHQ[..., None]).astype(dt), m_BHQ + jnp.log(l_BHQ)

    out_NBHQK, lse_NBHQ = jax.lax.map(query_block, (q_NBHQK, q_order_NQ, needed_N))
    out_BHLK = out_NBHQK.transpose(1, 2, 0, 3, 4).reshape(B, H, L, K)
    return out_BHLK, lse_NBHQ.transpose(1, 2, 0, 3).reshape(B, H, L)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def blockwise(q_BHLK, k_BHMK, v_BHMK, q_order, k_order, scale, bq, bk):
    """Flash attention on [B, H, L, K] blocks of bq queries and bk keys (L % bq == M % bk == 0)."""
    return _blockwise_forward(q_BHLK, k_BHMK, v_BHMK, q_order, k_order, scale, bq, bk)[0]


def _blockwise_fwd(q_BHLK, k_BHMK, v_BHMK, q_order, k_order, scale, bq, bk):
    out_BHLK, lse_BHL = _blockwise_forward(q_BHLK, k_BHMK, v_BHMK, q_order, k_order, scale, bq, bk)
    return out_BHLK, (q_BHLK, k_BHMK, v_BHMK, q_order, k_order, out_BHLK, lse_BHL)


def _blockwise_bwd(scale, bq, bk, residuals, dout_BHLK):
    """Recomputes each visible block's probabilities from the saved logsumexp (no L x M array):
    dq per query block in the inner carry, dk and dv accumulated over query blocks."""
    q_BHLK, k_BHMK, v_BHMK, q_order, k_order, out_BHLK, lse_BHL = residuals
    B, H, L, K = q_BHLK.shape
    dt = q_BHLK.dtype
    N = L // bq
    delta_BHL = jnp.sum(dout_BHLK.astype(jnp.float32) * out_BHLK.astype(jnp.float32), -1)
    blocks = lambda x: jnp.moveaxis(x.reshape(B, H, N, bq, *x.shape[3:]), 2, 0)  # noqa: E731
    q_order_NQ = q_order.reshape(N, bq)
    needed_N = _key_blocks_needed(q_order_NQ, k_order, bk)

    def query_block(carry, args):
        q_BHQK, do_BHQK, lse_BHQ, delta_BHQ, qo_Q, needed = args

        def key_block(j, inner):
            dq_BHQK, dk_BHMK, dv_BHMK = inner
            k_j = jax.lax.dynamic_slice_in_dim(k_BHMK, j * bk, bk, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v_BHMK, j * bk, bk, axis=2)
            ko_M = jax.lax.dynamic_slice_in_dim(k_order, j * bk, bk)
            p_BHQM = jnp.exp(_block_logits(q_BHQK, k_j, qo_Q, ko_M, scale) - lse_BHQ[..., None])
            dv_j = jnp.einsum('bhqm,bhqk->bhmk', p_BHQM.astype(dt), do_BHQK,
                              preferred_element_type=jnp.float32)
            dp_BHQM = jnp.einsum('bhqk,bhmk->bhqm', do_BHQK, v_j, preferred_element_type=jnp.float32)
            ds_BHQM = (p_BHQM * (dp_BHQM - delta_BHQ[..., None]) * scale).astype(dt)
            dq_BHQK = dq_BHQK + jnp.einsum('bhqm,bhmk->bhqk', ds_BHQM, k_j,
                                           preferred_element_type=jnp.float32)
            dk_j = jnp.einsum('bhqm,bhqk->bhmk', ds_BHQM, q_BHQK, preferred_element_type=jnp.float32)
            add = lambda acc, d: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, j * bk, bk, axis=2) + d, j * bk, axis=2)
            return dq_BHQK, add(dk_BHMK, dk_j), add(dv_BHMK, dv_j)

        dq_BHQK = jnp.zeros((B, H, bq, K), jnp.float32)
        dq_BHQK, dk_BHMK, dv_BHMK = jax.lax.fori_loop(0, needed, key_block, (dq_BHQK, *carry))
        return (dk_BHMK, dv_BHMK), dq_BHQK

    zeros = jnp.zeros(k_BHMK.shape, jnp.float32)
    (dk_BHMK, dv_BHMK), dq_NBHQK = jax.lax.scan(
        query_block, (zeros, zeros),
        (blocks(q_BHLK), blocks(dout_BHLK.astype(dt)), blocks(lse_BHL), blocks(delta_BHL),
         q_order_NQ, needed_N))
    dq_BHLK = jnp.moveaxis(dq_NBHQK, 0, 2).reshape(B, H, L, K)
    return (dq_BHLK.astype(dt), dk_BHMK.astype(k_BHMK.dtype), dv_BHMK.astype(v_BHMK.dtype),
            None, None)


blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ----------------------------------------------------------------------------- splash

LANES = 128   # splash's key blocks must be multiples of the TPU lane width


def _splash_block(length: int, target: int) -> int:
    """The largest multiple of 128 that divides `length` and is at most max(target, 128)."""
    for block in range(max(target, LANES) // LANES * LANES, LANES - 1, -LANES):
        if length % block == 0:
            return block
    raise AssertionError(length)


@functools.lru_cache(maxsize=32)
def _splash_mask(order_bytes: bytes, causal: bool, n_heads: int):
    """The kernel's mask object (numpy only, so it may be shared by every trace)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    order = np.frombuffer(order_bytes, np.int32)
    shape = (len(order), len(order))
    one = (sa.CausalMask(shape) if causal
           else sa.NumpyMask(order[None, :] <= order[:, None]))
    return sa.MultiHeadMask([one] * n_heads)


def _splash_kernel(order_bytes: bytes, causal: bool, n_heads: int, head_shards: int,
                   q_seq_shards: int, block_q: int, block_kv: int, interpret: bool):
    # Built inside the trace that uses it: its mask tables become constants of this program
    # (built eagerly they would be placed on the step's mesh, which may be abstract TPU chips
    # compiled for ahead of time). JAX caches the mask processing across calls with one mask.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=block_q, block_kv_dkv=block_kv,
                           block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
    return sa.make_splash_mha(_splash_mask(order_bytes, causal, n_heads), block_sizes=blocks,
                              head_shards=head_shards, q_seq_shards=q_seq_shards,
                              interpret=interpret)


def _axis_size(axes) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in names)


def _splash(q_BLHK, k_BMGK, v_BMGK, order_L, scale, block_size):
    B, L, H, K = q_BLHK.shape
    dt = q_BLHK.dtype
    sharded = not jax.sharding.get_abstract_mesh().empty
    q_spec, kv_spec, length = _specs()
    seq_shards = _axis_size(length) if sharded else 1
    head_shards = _axis_size(q_spec[2]) if sharded else 1
    # Pad so every sequence shard holds whole 128-wide blocks; padded keys stay hidden
    # (the causal mask already hides them, the order mask through PAD_ORDER).
    Lp = -(-L // (LANES * seq_shards)) * LANES * seq_shards
    causal = bool((order_L == causal_order(L)).all())
    order = np.concatenate([order_L, np.full(Lp - L, PAD_ORDER, np.int32)])
    kernel = _splash_kernel(order.tobytes(), causal, H, head_shards, seq_shards,
                            _splash_block(Lp // seq_shards, block_size), _splash_block(Lp, block_size),
                            platform() != 'tpu')
    # Splash has no logit scale: it goes on q (in float32, then back to the compute dtype).
    q_BLHK = (q_BLHK.astype(jnp.float32) * scale).astype(dt)
    q_BLHK, k_BMGK, v_BMGK = (_pad_to(x, 1, Lp) for x in (q_BLHK, k_BMGK, v_BMGK))

    def run(kernel, q_BLHK, k_BMGK, v_BMGK):
        heads = q_BLHK.shape[2]
        to_BHLK = lambda x: repeat_kv(x, heads).transpose(0, 2, 1, 3).astype(dt)  # noqa: E731
        out_BHLK = jax.vmap(kernel)(to_BHLK(q_BLHK), to_BHLK(k_BMGK), to_BHLK(v_BMGK))
        return out_BHLK.transpose(0, 2, 1, 3)

    if sharded:
        mesh = jax.sharding.get_abstract_mesh()
        kernel_spec = kernel.manual_sharding_spec(
            jax.sharding.NamedSharding(mesh, P(q_spec[2], length)))
        run = jax.shard_map(run, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec),
                            out_specs=q_spec, check_vma=False)
    return run(kernel, q_BLHK, k_BMGK, v_BMGK)[:, :L]
