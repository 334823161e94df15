"""The `Generator` value: a pure generative model ``z -> images`` with its parameters.

Like `Network`, it is a pytree whose only leaves are the parameters.
``gen.apply(params, z: (B, latent_dim)) -> (B, H, W, C)`` images in ``output_range``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from .network import _freeze, _thaw, content_hash


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class Generator:
    """A generator ``apply(params, z: (B, latent_dim)) -> (B, *output_shape)`` with values in ``output_range``.

    Attributes:
      apply: pure function of the parameters and a latent batch.
      params: pytree of arrays.
      latent_dim: size of one latent vector.
      output_shape: ``(H, W, C)`` of one generated image.
      output_range: ``(lo, hi)`` of the generated pixel values, e.g. ``(-1, 1)`` for tanh outputs.
      name: human-readable name.
      arch: JSON-serialisable description; with the parameters it determines `hash`.
    """

    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    latent_dim: int
    output_shape: tuple[int, ...]
    output_range: tuple[float, float] = (-1.0, 1.0)
    name: str = "generator"
    arch: Any = None

    def tree_flatten(self):
        aux = (self.apply, self.latent_dim, self.output_shape, self.output_range, self.name, _freeze(self.arch))
        return (self.params,), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        apply, latent_dim, output_shape, output_range, name, arch = aux
        return cls(apply, children[0], latent_dim, output_shape, output_range, name, _thaw(arch))

    def __call__(self, z: jax.Array) -> jax.Array:
        """Images ``(B, *output_shape)`` of a latent batch ``z: (B, latent_dim)``."""
        return self.apply(self.params, z)

    def to_unit(self, images: jax.Array) -> jax.Array:
        """Map generated images from ``output_range`` affinely to [0, 1]."""
        lo, hi = self.output_range
        return (images - lo) / (hi - lo)

    @property
    def hash(self) -> str:
        """Content hash (16 hex digits) of architecture + parameters."""
        return content_hash(self.arch, self.params)
