"""Every test runs on CPU with 8 simulated devices and a persistent compilation cache."""

import os

# Must happen before anything initialises a JAX backend; afterwards it is silently ignored.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The measured CPU peak (MFU's denominator) is cached next to the compilation cache, not in the
# user's cache directory; subprocesses of the tests inherit the setting.
os.environ.setdefault('PRETRAIN_PEAK_FLOPS_CACHE', os.path.join(_ROOT, '.jax_cache', 'peak_flops.json'))

import jax  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.path.join(_ROOT, '.jax_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
