"""Building blocks shared by every tower: Linear, norms, GELU/SwiGLU MLPs.

Weights keep PyTorch's order, `[out..., in...]`: conversion is then a reshape, never a transpose, and on
XLA:CPU a small-batch matmul against an `[out, in]` operand reads memory 3-4x faster than against `[in, out]`
(../shared/PERF_NOTES.md). Every parameter carries logical axis names, which dvl_jax/sharding/ maps onto a device mesh.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dvl_jax.sharding import constrain

Dtype = jnp.dtype
Axes = tuple[str | None, ...]

default_init = nn.initializers.normal(stddev=0.02)  # transformers' initializer_range


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Axes, dtype) -> jax.Array:
  """A parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as SigLIP, SAM and the aligners of DeepSeek-VL use (torch nn.GELU())."""
  return jax.nn.gelu(x, approximate=False)


class Linear(nn.Module):
  """y = x W^T + b over the last `len(in_shape)` axes of x; W is `[*out_shape, *in_shape]`.

  Attributes:
    out_shape: output feature shape, e.g. `(N, H)` for a query projection.
    axes: logical names of the kernel's axes, out axes first.
    num_in_axes: how many trailing axes of x are contracted.
  """

  out_shape: tuple[int, ...]
  axes: Axes
  num_in_axes: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = self.num_in_axes, len(self.out_shape)
    assert len(self.axes) == n_out + n_in, (self.axes, self.out_shape, n_in)
    kernel = param(self, "kernel", default_init, (*self.out_shape, *x.shape[x.ndim - n_in:]), self.axes,
                   self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    # The kernel is the dot's left operand: XLA:CPU then reads it in its stored [out, in] order instead of
    # transposing a copy of it on every call; the (small) [*out, ...] result is transposed back.
    contract = (tuple(range(n_out, n_out + n_in)), tuple(range(x.ndim - n_in, x.ndim)))
    y = lax.dot_general(kernel, x, (contract, ((), ())))  # [*out_shape, ...]
    y = jnp.moveaxis(y, tuple(range(n_out)), tuple(range(y.ndim - n_out, y.ndim)))  # [..., *out_shape]
    if self.use_bias:
      y = y + param(self, "bias", nn.initializers.zeros, self.out_shape, self.axes[:n_out],
                    self.param_dtype).astype(self.dtype)
    return y


class Conv(nn.Module):
  """2-D convolution on channels-last maps [B, H, W, C]; kernel HWIO (PyTorch's OIHW transposed by the
  converter). Padding is explicit, as PyTorch's: `padding=1` is ((1, 1), (1, 1)), which is not "SAME" at
  stride 2."""

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = param(self, "kernel", default_init, (k, k, c, self.features), (None, None, "conv_in", "embed"),
                   self.param_dtype)
    pad = ((self.padding, self.padding), (self.padding, self.padding))
    y = lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride), pad,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + param(self, "bias", nn.initializers.zeros, (self.features,), ("embed",),
                    self.param_dtype).astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Ref: transformers LlamaRMSNorm: normalise in float32, cast back, then scale."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, statistics in float32 (two-pass variance, as PyTorch)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = param(self, "scale", nn.initializers.ones, (d,), ("embed",), self.param_dtype)
    bias = param(self, "bias", nn.initializers.zeros, (d,), ("embed",), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class GeluMLP(nn.Module):
  """fc2(gelu(fc1(x))), with biases: the ViT MLP. Ref: transformers SiglipMLP (hidden_act="gelu"), SamMLPBlock.

  `names` are the two Linears' names: ("fc1", "fc2") in SigLIP, ("lin1", "lin2") in SAM.
  """

  mlp_dim: int
  names: tuple[str, str] = ("fc1", "fc2")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., D]
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    h = gelu(Linear((self.mlp_dim,), ("mlp", "embed"), name=self.names[0], **kw)(x))  # [..., F]
    return Linear((x.shape[-1],), ("embed", "mlp"), name=self.names[1], **kw)(h)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), no biases. Ref: transformers LlamaMLP."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, T, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Linear((self.mlp_dim,), ("mlp", "embed"), name="gate_proj", **kw)(x)
    up = Linear((self.mlp_dim,), ("mlp", "embed"), name="up_proj", **kw)(x)
    h = constrain(nn.silu(gate) * up, ("batch", "seq", "act_mlp"))  # [B, T, F]
    return Linear((x.shape[-1],), ("embed", "mlp"), name="down_proj", **kw)(h)
