"""Both VAR stages on the embedded digits through the real entry point; figures and docs/var.md.

    python -m experiments.var_tiny --runs=runs/var_tiny

Stage 1 (configs/var_tokenizer_tiny.py) and stage 2 (configs/var_tiny.py) run as
`python -m pretrain.train` subprocesses; finished stages are not trained again. Then:
reconstructions of held-out digits, class-conditional samples (one column per class), the
per-scale losses and the number of sequential sampling steps against a raster-order model.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_RUNS = flags.DEFINE_string('runs', 'runs/var_tiny', 'Where both runs live.')
_DOCS = flags.DEFINE_string('docs', 'docs', 'Where the figures and var.md go.')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(config: str, workdir: str, *overrides: str) -> None:
    if os.path.exists(os.path.join(workdir, 'done')):
        return
    cmd = [sys.executable, '-m', 'pretrain.train', f'--config={config}', f'--workdir={workdir}',
           '--config.metrics.tensorboard=False', *overrides]
    print(' '.join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    open(os.path.join(workdir, 'done'), 'w').close()


def _rows(workdir: str, split: str) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r.get('split') == split]


def main(argv) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import common
    from model_zoo import var as var_lib
    from model_zoo import var_sample
    from pretrain.data import images

    common.setup()
    tok_dir = os.path.abspath(os.path.join(_RUNS.value, 'tokenizer'))
    var_dir = os.path.abspath(os.path.join(_RUNS.value, 'var'))
    _train('configs/var_tokenizer_tiny.py', tok_dir)
    _train('configs/var_tiny.py', var_dir, f'--config.data.image.tokenizer_dir={tok_dir}')
    # The dead-code remedy's ablation: the same tokenizer without the pull towards the data.
    no_pull_dir = os.path.abspath(os.path.join(_RUNS.value, 'tokenizer_no_pull'))
    _train('configs/var_tokenizer_tiny.py', no_pull_dir, '--config.model.var.dead_code_weight=0.0')

    model, cfg, step = var_lib.restore_model(var_dir)
    tokenizer, tok_step = var_lib.load_tokenizer(cfg)
    os.makedirs(_DOCS.value, exist_ok=True)

    # Reconstructions: held-out digits (top row) and their decoded multi-scale codes (below:
    # f_hat after 1, 2, ... scales, the last row is the full reconstruction).
    held_out = images.make_source(cfg.data.image, 'eval')
    originals = np.stack([held_out[i]['images'] for i in range(10)])
    codes = tokenizer.encode(jnp.asarray(originals))
    partial = [tokenizer.decode(f) for f in tokenizer.codes_to_features(codes)]
    rows = [originals] + [np.clip(np.asarray(p), -1, 1) for p in partial]
    var_sample.save_grid(np.concatenate(rows), os.path.join(_DOCS.value, 'var_reconstructions.png'),
                         ncol=10)
    rec_mse = float(np.mean((np.asarray(partial[-1]) - originals) ** 2))
    # Codebook usage over the whole held-out split (the training metric is per batch).
    every = np.stack([held_out[i]['images'] for i in range(len(held_out))])

    def codes_used(tok) -> int:
        return int(np.unique(np.concatenate([np.asarray(c).reshape(-1)
                                             for c in tok.encode(jnp.asarray(every))])).size)

    no_pull, _, _ = var_lib.restore_model(no_pull_dir)
    no_pull_rows = _rows(no_pull_dir, 'train')

    # Samples: 8 per class, one column per class, guidance rising to 2.0 over the scales, top-k.
    n, per_class = cfg.model.var.num_classes, 8
    labels = jnp.repeat(jnp.arange(n, dtype=jnp.int32), per_class)
    samples, _ = var_sample.sample(model, tokenizer, labels, jax.random.PRNGKey(0),
                                   cfg_scale=2.0, top_k=20, top_p=0.95)
    order = np.arange(n * per_class).reshape(n, per_class).T.reshape(-1)
    var_sample.save_grid(np.asarray(samples)[order], os.path.join(_DOCS.value, 'var_samples.png'),
                         ncol=n)

    pns = tuple(cfg.model.var.patch_nums)
    steps_tiny = var_sample.sampling_steps(pns)
    steps_d16 = var_sample.sampling_steps((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    tok_train, tok_eval = _rows(tok_dir, 'train'), _rows(tok_dir, 'eval')
    var_train, var_eval = _rows(var_dir, 'train'), _rows(var_dir, 'eval')
    last = var_train[-1]
    per_scale = {pn: last[f'loss_{pn}x{pn}'] for pn in pns}
    summary = {
        'tokenizer': {'steps': tok_step, 'first_loss': tok_train[0]['loss'],
                      'last': {k: tok_train[-1][k] for k in ('loss', 'rec_loss', 'vq_loss',
                                                               'perplexity', 'dead_codes')},
                      'eval_loss': tok_eval[-1]['loss'], 'heldout_rec_mse': rec_mse,
                      'heldout_codes_used': codes_used(tokenizer),
                      'no_pull': {'heldout_codes_used': codes_used(no_pull),
                                  'eval_loss': _rows(no_pull_dir, 'eval')[-1]['loss'],
                                  'last_rec_loss': no_pull_rows[-1]['rec_loss'],
                                  'last_perplexity': no_pull_rows[-1]['perplexity']},
                      'codebook_size': cfg.model.var.codebook_size},
        'var': {'steps': step, 'first_loss': var_train[0]['loss'], 'last_loss': last['loss'],
                'eval_loss': var_eval[-1]['loss'], 'per_scale_train_loss': per_scale,
                'uniform_loss': float(np.log(cfg.model.var.codebook_size))},
        'sampling_steps': {'tiny': steps_tiny, 'd16_256px': steps_d16},
    }
    with open(os.path.join(_DOCS.value, 'var.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == '__main__':
    app.run(main)
