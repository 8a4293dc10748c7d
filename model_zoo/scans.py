"""Linear recurrences of state-space models, computed in float32 whatever the inputs' dtype.

Mamba-1 (selective scan), per channel e and state n:
    h_t[e, n] = exp(dt_t[e] A[e, n]) h_{t-1}[e, n] + dt_t[e] B_t[n] x_t[e]
    y_t[e] = sum_n C_t[n] h_t[e, n] + D[e] x_t[e]
Mamba-2 (SSD), per head h (scalar A[h], dt_t[h]), head channel p, state n, B/C of the head's group:
    h_t[h, p, n] = exp(dt_t[h] A[h]) h_{t-1}[h, p, n] + dt_t[h] x_t[h, p] B_t[n]
    y_t[h, p] = sum_n C_t[n] h_t[h, p, n] + D[h] x_t[h, p]

Every function returns (y, final state) so the same code serves training and generation.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _combine(left: tuple, right: tuple) -> tuple:
    """Composition of h -> a h + b maps: left first, then right."""
    a_l, b_l = left
    a_r, b_r = right
    return a_r * a_l, a_r * b_l + b_r


def _pad_length(arrays: list[jax.Array], multiple: int) -> tuple[list[jax.Array], int]:
    """Zero-pads axis 1 up to a multiple; dt = 0 there makes padded steps leave h unchanged."""
    L = arrays[0].shape[1]
    pad = -L % multiple
    if pad:
        arrays = [jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    return arrays, L


def _inputs(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, h0_BEN):
    Bsz, _, E = x_BLE.shape
    N = A_EN.shape[1]
    h0_BEN = jnp.zeros((Bsz, E, N), f32) if h0_BEN is None else h0_BEN.astype(f32)
    return [t.astype(f32) for t in (x_BLE, dt_BLE, A_EN, B_BLN, C_BLN)] + [h0_BEN]


def scan_sequential(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN=None):
    """One step per token with `lax.scan`: memory O(B E N) for the state, slow in L."""
    x, dt, A, Bm, Cm, h0 = _inputs(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, h0_BEN)

    def step(h_BEN, inp):
        x_BE, dt_BE, B_BN, C_BN = inp
        h_BEN = jnp.exp(dt_BE[..., None] * A) * h_BEN + (dt_BE * x_BE)[..., None] * B_BN[:, None, :]
        return h_BEN, jnp.einsum('ben,bn->be', h_BEN, C_BN)

    seq = [jnp.moveaxis(t, 1, 0) for t in (x, dt, Bm, Cm)]
    hL_BEN, y_LBE = jax.lax.scan(step, h0, seq)
    y_BLE = jnp.moveaxis(y_LBE, 0, 1) + D_E.astype(f32) * x
    return y_BLE, hL_BEN


def _associative(x, dt, A, Bm, Cm, h0):
    """Parallel prefix over axis 1 of the whole (B, L, E, N) tensor; returns y without D and h_L."""
    a_BLEN = jnp.exp(dt[..., None] * A)
    b_BLEN = (dt * x)[..., None] * Bm[:, :, None, :]
    b_BLEN = b_BLEN.at[:, 0].add(a_BLEN[:, 0] * h0)   # fold the initial state into step 0
    _, h_BLEN = jax.lax.associative_scan(_combine, (a_BLEN, b_BLEN), axis=1)
    return jnp.einsum('blen,bln->ble', h_BLEN, Cm), h_BLEN[:, -1]


def scan_associative(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN=None):
    """`lax.associative_scan` over the whole sequence: log-depth, memory O(B L E N)."""
    x, dt, A, Bm, Cm, h0 = _inputs(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, h0_BEN)
    y_BLE, hL_BEN = _associative(x, dt, A, Bm, Cm, h0)
    return y_BLE + D_E.astype(f32) * x, hL_BEN


def scan_chunked(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, D_E, h0_BEN=None, *, chunk_size: int = 64):
    """Sequential over chunks, associative inside: memory O(B Q E N) per chunk.

    The chunk body is rematerialised in the backward pass, so only the chunk-boundary states
    (B, L/Q, E, N) are kept, instead of every step's state.
    """
    x, dt, A, Bm, Cm, h0 = _inputs(x_BLE, dt_BLE, A_EN, B_BLN, C_BLN, h0_BEN)
    (x_p, dt_p, B_p, C_p), L = _pad_length([x, dt, Bm, Cm], chunk_size)
    Bsz, Lp, E = x_p.shape
    n_chunks = Lp // chunk_size

    def chunks(t):   # (B, Lp, ...) -> (n_chunks, B, Q, ...)
        return jnp.moveaxis(t.reshape(Bsz, n_chunks, chunk_size, *t.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(h_BEN, inp):
        x_c, dt_c, B_c, C_c = inp
        y_c, h_BEN = _associative(x_c, dt_c, A, B_c, C_c, h_BEN)
        return h_BEN, y_c

    hL_BEN, y_CBQE = jax.lax.scan(body, h0, [chunks(t) for t in (x_p, dt_p, B_p, C_p)])
    y_BLE = jnp.moveaxis(y_CBQE, 0, 1).reshape(Bsz, Lp, E)[:, :L]
    return y_BLE + D_E.astype(f32) * x, hL_BEN


SELECTIVE_SCANS: dict[str, Callable] = {
    'sequential': scan_sequential,
    'associative': scan_associative,
    'chunked': scan_chunked,
}


def selective_step(x_BE, dt_BE, A_EN, B_BN, C_BN, D_E, h_BEN):
    """One token of the Mamba-1 recurrence (generation): returns (y_BE, h_BEN)."""
    x, dt, B_BN, C_BN = (t.astype(f32) for t in (x_BE, dt_BE, B_BN, C_BN))
    h_BEN = jnp.exp(dt[..., None] * A_EN.astype(f32)) * h_BEN + (dt * x)[..., None] * B_BN[:, None]
    return jnp.einsum('ben,bn->be', h_BEN, C_BN) + D_E.astype(f32) * x, h_BEN


# ---------------------------------------------------------------------------------------------
# Mamba-2 (SSD)


def _heads(t_BLGN: jax.Array, n_heads: int) -> jax.Array:
    """Group-shared B or C -> one copy per head (heads of group g are g*H/G ... (g+1)*H/G - 1)."""
    G = t_BLGN.shape[2]
    return jnp.repeat(t_BLGN, n_heads // G, axis=2)


def ssd_step(x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H, h_BHPN):
    """One token of the SSD recurrence (generation): returns (y_BHP, h_BHPN)."""
    H = x_BHP.shape[1]
    x, dt, A = x_BHP.astype(f32), dt_BH.astype(f32), A_H.astype(f32)
    B_BHN = _heads(B_BGN.astype(f32)[:, None], H)[:, 0]
    C_BHN = _heads(C_BGN.astype(f32)[:, None], H)[:, 0]
    decay_BH = jnp.exp(dt * A)
    h_BHPN = (decay_BH[..., None, None] * h_BHPN
              + (dt[..., None] * x)[..., None] * B_BHN[:, :, None, :])
    y_BHP = jnp.einsum('bhpn,bhn->bhp', h_BHPN, C_BHN) + D_H.astype(f32)[:, None] * x
    return y_BHP, h_BHPN


def ssd_sequential(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, h0_BHPN=None):
    """The SSD recurrence one token at a time (reference for the chunked algorithm)."""
    Bsz, _, H, P = x_BLHP.shape
    N = B_BLGN.shape[-1]
    h0 = jnp.zeros((Bsz, H, P, N), f32) if h0_BHPN is None else h0_BHPN.astype(f32)

    def step(h, inp):
        x_BHP, dt_BH, B_BGN, C_BGN = inp
        y_BHP, h = ssd_step(x_BHP, dt_BH, A_H, B_BGN, C_BGN, D_H, h)
        return h, y_BHP

    seq = [jnp.moveaxis(t, 1, 0) for t in (x_BLHP, dt_BLH, B_BLGN, C_BLGN)]
    hL, y_LBHP = jax.lax.scan(step, h0, seq)
    return jnp.moveaxis(y_LBHP, 0, 1), hL


def segsum(a_XQ: jax.Array) -> jax.Array:
    """S[..., i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.

    Summing masked copies (not differencing a cumsum) keeps it exact when cumsums grow large.
    """
    Q = a_XQ.shape[-1]
    a_XQQ = jnp.broadcast_to(a_XQ[..., None], (*a_XQ.shape, Q))       # [..., i, j] = a[i]
    strictly_lower = jnp.tril(jnp.ones((Q, Q), bool), k=-1)
    s_XQQ = jnp.cumsum(jnp.where(strictly_lower, a_XQQ, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((Q, Q), bool)), s_XQQ, -jnp.inf)


def ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, D_H, h0_BHPN=None, *, chunk_size: int = 64):
    """The chunked SSD algorithm: most of the work becomes matmuls of chunk size Q.

    (1) intra-chunk outputs Y_diag = (C B^T o decay mask) (dt x); (2) each chunk's final state
    from its own inputs; (3) a short recurrence over chunk states; (4) the state entering each
    chunk mapped to its outputs, Y_off. Lengths that are not a multiple of Q are zero-padded.
    """
    Bsz, _, H, P = x_BLHP.shape
    N = B_BLGN.shape[-1]
    Q = chunk_size
    x, dt = x_BLHP.astype(f32), dt_BLH.astype(f32)
    B_BLHN, C_BLHN = _heads(B_BLGN.astype(f32), H), _heads(C_BLGN.astype(f32), H)
    (x, dt, B_BLHN, C_BLHN), L = _pad_length([x, dt, B_BLHN, C_BLHN], Q)
    n_chunks = x.shape[1] // Q

    def chunks(t):   # (B, Lp, ...) -> (B, C, Q, ...)
        return t.reshape(Bsz, n_chunks, Q, *t.shape[2:])

    x_BCQHP, dt_BCQH, B_BCQHN, C_BCQHN = map(chunks, (x, dt, B_BLHN, C_BLHN))
    a_BHCQ = (dt_BCQH * A_H.astype(f32)).transpose(0, 3, 1, 2)   # dt A <= 0
    a_cum_BHCQ = jnp.cumsum(a_BHCQ, axis=-1)
    xdt_BCQHP = x_BCQHP * dt_BCQH[..., None]

    # (1) within each chunk: a masked, decayed attention-like matmul.
    decay_BHCQQ = jnp.exp(segsum(a_BHCQ))
    scores_BHCQQ = jnp.einsum('bcihn,bcjhn->bhcij', C_BCQHN, B_BCQHN) * decay_BHCQQ
    y_diag_BCQHP = jnp.einsum('bhcij,bcjhp->bcihp', scores_BHCQQ, xdt_BCQHP)

    # (2) the state each chunk leaves behind from its own inputs (decayed to the chunk's end).
    to_end_BHCQ = jnp.exp(a_cum_BHCQ[..., -1:] - a_cum_BHCQ)
    states_BCHPN = jnp.einsum('bcjhn,bhcj,bcjhp->bchpn', B_BCQHN, to_end_BHCQ, xdt_BCQHP)

    # (3) recurrence over chunks: the state entering chunk c.
    h0 = jnp.zeros((Bsz, H, P, N), f32) if h0_BHPN is None else h0_BHPN.astype(f32)
    chunk_decay_CBH = jnp.moveaxis(jnp.exp(a_cum_BHCQ[..., -1]), 2, 0)

    def carry(h_BHPN, inp):
        decay_BH, new_BHPN = inp
        return decay_BH[..., None, None] * h_BHPN + new_BHPN, h_BHPN

    hL_BHPN, h_in_CBHPN = jax.lax.scan(carry, h0, (chunk_decay_CBH, jnp.moveaxis(states_BCHPN, 1, 0)))

    # (4) the entering state's contribution to every position of its chunk.
    y_off_BCQHP = jnp.einsum('bcihn,cbhpn,bhci->bcihp', C_BCQHN, h_in_CBHPN, jnp.exp(a_cum_BHCQ))
    y_BLHP = (y_diag_BCQHP + y_off_BCQHP).reshape(Bsz, n_chunks * Q, H, P)[:, :L]
    return y_BLHP + D_H.astype(f32)[:, None] * x_BLHP.astype(f32), hL_BHPN
