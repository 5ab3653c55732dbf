"""Flash (portable) and Pallas vs dense attention on whatever backend JAX finds (run it on a
GPU/TPU host; the test suite checks the same on CPU, Pallas interpreted): values, guidance losses
and gradients in float32, no dropout, on fresh random inputs with padded rows and token heads.

    python benchmarks/flash_check.py [flash] [pallas]

The dense reference runs at the highest matmul precision; the kernels at the backend's default
(TF32 on recent NVIDIA GPUs), so relative errors near 1e-3 are that precision, not a bug. Each
line gives ``‖kernel - dense‖ / ‖dense‖`` and the largest absolute difference.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from guided_jax.guidance import HeadSpec, group_losses, losses_from_head_sums, token_masks
from guided_jax.kernels.dense import attention_bias, attention_probs
from guided_jax.kernels.flash import flash_attention
from guided_jax.kernels.pallas import pallas_attention

spec = HeadSpec.parse("self:1,next:1,prev:1,first:2,token[7]:1,token[9]:1")
B, n, H, d = 4, 512, 12, 64
keys = jax.random.split(jax.random.key(int(time.time())), 4)
q, k, v = (jax.random.normal(key, (B, n, H, d)) for key in keys[:3])
ids = jax.random.randint(keys[3], (B, n), 0, 50)
mask = jnp.arange(n)[None, :] < jnp.array([n, n - 100, n - 7, 300])[:, None]
masks = token_masks(ids, [7, 9])


def dense(q, k, v):
    with jax.default_matmul_precision("highest"):
        probs = attention_probs(q, k, attention_bias(mask))
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v), group_losses(probs, spec, masks)


def flash(q, k, v):
    out, sums = flash_attention(q, k, v, mask, spec=spec, token_masks=masks, block=256)
    return out, losses_from_head_sums(sums, spec, B, n)


def pallas(q, k, v):
    out, sums = pallas_attention(q, k, v, mask, spec=spec, token_masks=masks)
    return out, losses_from_head_sums(sums, spec, B, n)


def objective(f):
    return lambda *a: jnp.sum(jnp.sin(f(*a)[0])) + 1e3 * jnp.sum(f(*a)[1])


def compare(label, kernel):
    got_out, got_losses = jax.jit(kernel)(q, k, v)
    want_out, want_losses = jax.jit(dense)(q, k, v)
    got_grads = jax.jit(jax.grad(objective(kernel), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.jit(jax.grad(objective(dense), argnums=(0, 1, 2)))(q, k, v)
    pairs = [("out", got_out, want_out), ("losses", got_losses, want_losses)]
    pairs += list(zip(("dq", "dk", "dv"), got_grads, want_grads, strict=True))
    for name, got, want in pairs:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        relative = np.linalg.norm(got - want) / np.linalg.norm(want)
        print(f"{label} {name}: relative error {relative:.2e}, max abs diff "
              f"{np.max(np.abs(got - want)):.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    print("device:", jax.devices()[0].device_kind, flush=True)
    kernels = {"flash": flash, "pallas": pallas}
    for label in sys.argv[1:] or list(kernels):
        compare(label, kernels[label])
