"""pretrain/var_official.py against state dicts in the official VAR layout (pytest -m interop).

The official layout is written out here independently of the converter's name table, from the
reference code's constructors (models/basic_vae.py, quant.py, var.py, basic_var.py of Tian et
al.'s repository), for a tiny config; the files are random tensors saved with torch.save.
Neither layout has been checked against the released .pth files.
"""

import math
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_zoo import var, var_sample
from pretrain import checkpoint as checkpoint_lib
from pretrain import var_official
from pretrain.errors import ConfigError
from tests.test_var_published import published_var_config

pytestmark = pytest.mark.interop


def official_vae_shapes(ch: int, ch_mult: tuple, z: int, vocab: int, n_phi: int,
                        n_scales: int) -> dict[str, tuple]:
    """Names and shapes of the reference VQVAE's state dict (2 res blocks per level)."""
    s = {}

    def conv(name, c_in, c_out, k):
        s[f'{name}.weight'], s[f'{name}.bias'] = (c_out, c_in, k, k), (c_out,)

    def norm(name, c):
        s[f'{name}.weight'], s[f'{name}.bias'] = (c,), (c,)

    def res(name, c_in, c_out):
        norm(f'{name}.norm1', c_in)
        conv(f'{name}.conv1', c_in, c_out, 3)
        norm(f'{name}.norm2', c_out)
        conv(f'{name}.conv2', c_out, c_out, 3)
        if c_in != c_out:
            conv(f'{name}.nin_shortcut', c_in, c_out, 1)

    def attn(name, c):
        norm(f'{name}.norm', c)
        conv(f'{name}.qkv', c, 3 * c, 1)
        conv(f'{name}.proj_out', c, c, 1)

    def mid(name, c):
        res(f'{name}.mid.block_1', c, c)
        attn(f'{name}.mid.attn_1', c)
        res(f'{name}.mid.block_2', c, c)

    n, in_mult = len(ch_mult), (1,) + tuple(ch_mult)
    conv('encoder.conv_in', 3, ch, 3)
    for i in range(n):
        c_in, c_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(2):
            res(f'encoder.down.{i}.block.{j}', c_in, c_out)
            c_in = c_out
            if i == n - 1:
                attn(f'encoder.down.{i}.attn.{j}', c_in)
        if i != n - 1:
            conv(f'encoder.down.{i}.downsample.conv', c_in, c_in, 3)
    mid('encoder', c_in)
    norm('encoder.norm_out', c_in)
    conv('encoder.conv_out', c_in, z, 3)
    c_in = ch * ch_mult[-1]
    conv('decoder.conv_in', z, c_in, 3)
    mid('decoder', c_in)
    for i in reversed(range(n)):
        c_out = ch * ch_mult[i]
        for j in range(3):
            res(f'decoder.up.{i}.block.{j}', c_in, c_out)
            c_in = c_out
            if i == n - 1:
                attn(f'decoder.up.{i}.attn.{j}', c_in)
        if i != 0:
            conv(f'decoder.up.{i}.upsample.conv', c_in, c_in, 3)
    norm('decoder.norm_out', c_in)
    conv('decoder.conv_out', c_in, 3, 3)
    conv('quant_conv', z, z, 3)
    conv('post_quant_conv', z, z, 3)
    s['quantize.embedding.weight'] = (vocab, z)
    for i in range(n_phi):
        conv(f'quantize.quant_resi.qresi_ls.{i}', z, z, 3)
    s['quantize.ema_vocab_hit_SV'] = (n_scales, vocab)
    return s


def official_var_shapes(C: int, depth: int, heads: int, vocab: int, z: int, classes: int,
                        patch_nums: tuple, mlp_ratio: float) -> dict[str, tuple]:
    """Names and shapes of the reference VAR's state dict (attn_l2_norm=True, shared_aln=False)."""
    L, F = sum(p * p for p in patch_nums), round(C * mlp_ratio)
    s = {'word_embed.weight': (C, z), 'word_embed.bias': (C,),
         'class_emb.weight': (classes + 1, C), 'pos_start': (1, patch_nums[0] ** 2, C),
         'pos_1LC': (1, L, C), 'lvl_embed.weight': (len(patch_nums), C),
         'lvl_1L': (1, L), 'attn_bias_for_masking': (1, 1, L, L),
         'head_nm.ada_lin.1.weight': (2 * C, C), 'head_nm.ada_lin.1.bias': (2 * C,),
         'head.weight': (vocab, C), 'head.bias': (vocab,)}
    for i in range(depth):
        b = f'blocks.{i}'
        s.update({f'{b}.attn.scale_mul_1H11': (1, heads, 1, 1),
                  f'{b}.attn.q_bias': (C,), f'{b}.attn.v_bias': (C,),
                  f'{b}.attn.zero_k_bias': (C,), f'{b}.attn.mat_qkv.weight': (3 * C, C),
                  f'{b}.attn.proj.weight': (C, C), f'{b}.attn.proj.bias': (C,),
                  f'{b}.ffn.fc1.weight': (F, C), f'{b}.ffn.fc1.bias': (F,),
                  f'{b}.ffn.fc2.weight': (C, F), f'{b}.ffn.fc2.bias': (C,),
                  f'{b}.ada_lin.1.weight': (6 * C, C), f'{b}.ada_lin.1.bias': (6 * C,)})
    return s


def _random_state_dict(shapes: dict[str, tuple], seed: int, std: float = 0.2):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name == 'lvl_1L':
            continue   # integer buffer, filled below
        out[name] = torch.randn(shape, generator=g) * std
    if 'lvl_1L' in shapes:
        out['lvl_1L'] = torch.zeros(shapes['lvl_1L'], dtype=torch.int64)
    return out


def _shapes_for(c):
    v, m = c.model.var, c.model
    vae = official_vae_shapes(v.base_channels, tuple(v.channel_mult), v.latent_channels,
                              v.codebook_size, v.n_phi, len(v.patch_nums))
    var_ = official_var_shapes(m.d_model, m.n_layers, m.n_heads, v.codebook_size,
                               v.latent_channels, v.num_classes, tuple(v.patch_nums), v.mlp_ratio)
    return vae, var_


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp('official')
    c = published_var_config('unused')
    vae_shapes, var_shapes = _shapes_for(c)
    vae_sd, var_sd = _random_state_dict(vae_shapes, 0), _random_state_dict(var_shapes, 1)
    torch.save(vae_sd, root / 'vae.pth')
    torch.save(var_sd, root / 'var.pth')
    workdir = str(root / 'run')
    records = var_official.convert(str(root / 'vae.pth'), str(root / 'var.pth'), c, workdir,
                                   devices=jax.devices()[:1])
    to_np = lambda sd: {k: t.float().numpy() for k, t in sd.items()}  # noqa: E731
    return c, workdir, to_np(vae_sd), to_np(var_sd), records, root


def _flat(params) -> dict[tuple, np.ndarray]:
    return {var_official._keys(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_every_tensor_lands_where_the_name_table_says(converted):
    c, workdir, vae_sd, var_sd, _, _ = converted
    heads = c.model.n_heads
    for folder, official, entry in (
            (os.path.join(workdir, 'tokenizer'), vae_sd, var_official.vae_entry),
            (workdir, var_sd, lambda p: var_official.var_entry(p, heads))):
        params, _, step = checkpoint_lib.restore_params(folder)
        assert step == 0
        ours = _flat(params)
        used = set()
        for path, value in ours.items():
            found = entry(path)
            np.testing.assert_array_equal(value, found.transform(official[found.name]),
                                          err_msg='.'.join(path))
            used.add(found.name)
        # Every official tensor but the known buffers has a place.
        buffers = {n for n in official if any(p.fullmatch(n) for p in var_official.IGNORED)}
        assert used == set(official) - buffers, sorted(set(official) - buffers - used)
        assert buffers   # the layouts do carry buffers


def test_layout_changes_written_out_by_hand(converted):
    """Independent of the converter's transforms: index by index, per the reference forward."""
    c, workdir, vae_sd, var_sd, _, _ = converted
    C, H = c.model.d_model, c.model.n_heads
    K = C // H
    p = _flat(checkpoint_lib.restore_params(workdir)[0])
    qkv = var_sd['blocks.1.attn.mat_qkv.weight']
    for which, name in enumerate(('wq', 'wk', 'wv')):
        ours = p[('blocks', '1', 'attn', name)]
        for h, k, d in ((0, 0, 0), (1, 3, 7), (H - 1, K - 1, C - 1)):
            assert ours[d, h, k] == qkv[which * C + h * K + k, d]
    wo, proj = p[('blocks', '1', 'attn', 'wo')], var_sd['blocks.1.attn.proj.weight']
    assert wo[1, 5, 9] == proj[9, 1 * K + 5]
    ada, ada_ref = p[('blocks', '0', 'ada', 'w')], var_sd['blocks.0.ada_lin.1.weight']
    # Reference chunks: gamma1, gamma2, scale1, scale2, shift1, shift2.
    for ours_n, ref_n in ((0, 4), (1, 2), (2, 0), (3, 5), (4, 3), (5, 1)):
        np.testing.assert_array_equal(ada[:, ours_n, :], ada_ref[ref_n * C:(ref_n + 1) * C].T)
    head_ada = p[('head_ada', 'b')]
    np.testing.assert_array_equal(head_ada[0], var_sd['head_nm.ada_lin.1.bias'][C:])   # shift
    np.testing.assert_array_equal(p[('blocks', '0', 'attn', 'log_logit_scale')],
                                  var_sd['blocks.0.attn.scale_mul_1H11'][0, :, 0, 0])
    np.testing.assert_array_equal(p[('pos_emb',)], var_sd['pos_1LC'][0])
    np.testing.assert_array_equal(p[('word_w',)], var_sd['word_embed.weight'].T)
    t = _flat(checkpoint_lib.restore_params(os.path.join(workdir, 'tokenizer'))[0])
    w = vae_sd['encoder.conv_in.weight']
    assert t[('encoder', 'conv_in', 'kernel')][2, 0, 1, 5] == w[5, 1, 2, 0]
    np.testing.assert_array_equal(t[('decoder', 'levels', '1', 'resample', 'kernel')],
                                  vae_sd['decoder.up.1.upsample.conv.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(t[('encoder', 'quant_conv', 'bias')], vae_sd['quant_conv.bias'])
    np.testing.assert_array_equal(t[('quantizer', 'phi', '1', 'bias')],
                                  vae_sd['quantize.quant_resi.qresi_ls.1.bias'])
    np.testing.assert_array_equal(t[('quantizer', 'codebook')], vae_sd['quantize.embedding.weight'])


def _reference_block_torch(sd: dict, i: int, x, cond, order, heads: int):
    """One block of the reference forward in torch from the official tensors (attn_l2_norm)."""
    import torch
    import torch.nn.functional as F

    t = lambda name: torch.as_tensor(sd[f'blocks.{i}.{name}'], dtype=torch.float64)  # noqa: E731
    B, L, C = x.shape
    ada = F.linear(F.silu(cond), t('ada_lin.1.weight'), t('ada_lin.1.bias'))
    gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.view(-1, 1, 6, C).unbind(2)
    ln = lambda h: F.layer_norm(h, (C,), eps=1e-6)  # noqa: E731
    h = ln(x) * (scale1 + 1) + shift1
    bias = torch.cat((t('attn.q_bias'), torch.zeros(C, dtype=torch.float64), t('attn.v_bias')))
    qkv = F.linear(h, t('attn.mat_qkv.weight'), bias).view(B, L, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scale = t('attn.scale_mul_1H11').clamp_max(math.log(100)).exp()
    q, k = F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)
    mask = torch.as_tensor(order[None, :] <= order[:, None])
    logits = (q @ k.transpose(-1, -2)).masked_fill(~mask, -torch.inf)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    x = x + F.linear(out, t('attn.proj.weight'), t('attn.proj.bias')) * gamma1
    h = ln(x) * (scale2 + 1) + shift2
    f = F.gelu(F.linear(h, t('ffn.fc1.weight'), t('ffn.fc1.bias')), approximate='tanh')
    return x + F.linear(f, t('ffn.fc2.weight'), t('ffn.fc2.bias')) * gamma2


def test_a_converted_block_computes_the_reference_forward(converted):
    import torch

    c, workdir, _, var_sd, _, _ = converted
    model, _, _ = var.restore_model(workdir)
    C = c.model.d_model
    rng = np.random.default_rng(0)
    x, cond = rng.normal(size=(2, 30, C)), rng.normal(size=(2, C))
    order = var.levels(model.patch_nums)
    want = _reference_block_torch(var_sd, 1, torch.as_tensor(x), torch.as_tensor(cond), order,
                                  c.model.n_heads).numpy()
    got, _ = model.blocks[1](jnp.asarray(x, jnp.float32), jnp.asarray(cond, jnp.float32), order)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_var_sample_runs_on_the_converted_checkpoint(converted):
    c, workdir, _, _, records, _ = converted
    assert records[1]['lineage'][0]['source'] == 'var_official'
    model, cfg, step = var.restore_model(workdir)
    assert step == 0 and cfg.model.var.arch == 'published'
    assert cfg.data.image.tokenizer_dir == os.path.join(os.path.abspath(workdir), 'tokenizer')
    tokenizer, _ = var.load_tokenizer(cfg)
    images, codes = var_sample.sample(model, tokenizer, jnp.arange(3, dtype=jnp.int32),
                                      jax.random.PRNGKey(0), cfg_scale=1.5, top_k=5, top_p=0.9)
    assert images.shape == (3, 8, 8, 3) and bool(jnp.isfinite(images).all())
    assert [x.shape for x in codes] == [(3, p * p) for p in c.model.var.patch_nums]


class _NotATensor:
    pass


def test_bad_files_and_configs_are_refused_before_writing(converted, tmp_path):
    import torch

    c, _, vae_sd, var_sd, _, root = converted
    torch_var = {k: torch.as_tensor(v) for k, v in var_sd.items()}
    missing = dict(torch_var)
    del missing['blocks.1.attn.q_bias']
    torch.save(missing, tmp_path / 'missing.pth')
    with pytest.raises(ConfigError, match=r"no tensor 'blocks\.1\.attn\.q_bias'"):
        var_official.convert(str(root / 'vae.pth'), str(tmp_path / 'missing.pth'), c,
                             str(tmp_path / 'a'), devices=jax.devices()[:1])
    extra = dict(torch_var, **{'blocks.9.attn.q_bias': torch.zeros(3)})
    torch.save(extra, tmp_path / 'extra.pth')
    with pytest.raises(ConfigError, match=r"1 tensor\(s\) the layout does not place.*blocks\.9"):
        var_official.convert(str(root / 'vae.pth'), str(tmp_path / 'extra.pth'), c,
                             str(tmp_path / 'b'), devices=jax.devices()[:1])
    wrong = dict(torch_var, **{'head.bias': torch.zeros(7)})
    torch.save(wrong, tmp_path / 'wrong.pth')
    with pytest.raises(ConfigError, match=r"'head\.bias' of shape \(7,\)"):
        var_official.convert(str(root / 'vae.pth'), str(tmp_path / 'wrong.pth'), c,
                             str(tmp_path / 'c'), devices=jax.devices()[:1])
    # An arbitrary pickled object is never rebuilt (weights_only=True).
    with open(tmp_path / 'object.pth', 'wb') as f:
        pickle.dump({'x': _NotATensor()}, f, protocol=2)
    with pytest.raises(ConfigError, match='not a plain PyTorch state dict'):
        var_official.read_state_dict(str(tmp_path / 'object.pth'))
    simple = published_var_config('unused')
    simple.model.var.arch = 'simple'
    with pytest.raises(ConfigError, match=r"model\.var\.arch='simple'.*'published'"):
        var_official.convert(str(root / 'vae.pth'), str(root / 'var.pth'), simple,
                             str(tmp_path / 'd'), devices=jax.devices()[:1])
    for name in 'abcd':
        assert not os.path.exists(tmp_path / name)
