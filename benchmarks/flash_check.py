"""Flash (portable) and Pallas vs dense attention on whatever backend JAX finds (run it on a
GPU/TPU host; the test suite checks the same on CPU, Pallas interpreted): values, guidance losses
and gradients, float32, no dropout.

    python benchmarks/flash_check.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from guided_jax.attention import attention_bias, attention_probs
from guided_jax.flash_attention import HeadPatterns, flash_attention
from guided_jax.guidance import HeadSpec, group_losses, losses_from_head_sums, token_masks
from guided_jax.pallas_attention import pallas_attention

jax.config.update("jax_default_matmul_precision", "highest")
spec = HeadSpec.parse("self:1,next:1,prev:1,first:2,token[7]:1")
B, n, H, d = 4, 1024, 12, 64
keys = jax.random.split(jax.random.key(0), 4)
q, k, v = (jax.random.normal(key, (B, n, H, d)) for key in keys[:3])
ids = jax.random.randint(keys[3], (B, n), 0, 50)
mask = jnp.arange(n)[None, :] < jnp.array([n, n - 100, n - 7, 300])[:, None]
masks = token_masks(ids, [7])


def dense(q, k, v):
    probs = attention_probs(q, k, attention_bias(mask))
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v), group_losses(probs, spec, masks)


def flash(q, k, v):
    out, sums = flash_attention(
        q, k, v, mask, patterns=HeadPatterns.from_spec(spec, H), token_masks=masks, block=256
    )
    return out, losses_from_head_sums(sums, spec, B, n)


def pallas(q, k, v):
    out, sums = pallas_attention(
        q, k, v, mask, patterns=HeadPatterns.from_spec(spec, H), token_masks=masks
    )
    return out, losses_from_head_sums(sums, spec, B, n)


def objective(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)[0])) + 1e3 * jnp.sum(f(*a)[1])


print("device:", jax.devices()[0].device_kind)
for label, kernel in (("flash", flash), ("pallas", pallas)):
    checks = [
        ("out", jax.jit(kernel)(q, k, v)[0], jax.jit(dense)(q, k, v)[0]),
        ("losses", jax.jit(kernel)(q, k, v)[1], jax.jit(dense)(q, k, v)[1]),
        *zip(
            ("dq", "dk", "dv"),
            jax.jit(jax.grad(objective(kernel), argnums=(0, 1, 2)))(q, k, v),
            jax.jit(jax.grad(objective(dense), argnums=(0, 1, 2)))(q, k, v),
            strict=True,
        ),
    ]
    for name, got, want in checks:
        err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
        scale = float(np.max(np.abs(want)))
        print(f"{label} {name}: max abs diff {err:.2e} (max |value| {scale:.2e})")
