"""PyTorch models with weight normalization, to wn_jax and back, exactly.

wn_jax never imports torch here unless the caller hands it torch objects (modules and
tensors are duck typed).

PyTorch stores a weight-normed tensor as ``g`` and ``v``, in one of two key styles:

- legacy ``torch.nn.utils.weight_norm``: ``<prefix>.weight_g``, ``<prefix>.weight_v``;
- ``torch.nn.utils.parametrizations.weight_norm``:
  ``<prefix>.parametrizations.weight.original0`` (g), ``...original1`` (v).

Weight norm on another tensor (``name='weight_hh_l0'``: ``weight_hh_l0_g`` / ``_v``, or
``parametrizations.weight_hh_l0.original0`` / ``1``), or on the ``weight`` of a layer with no
wn_jax WN layer (an Embedding, or, read from the module, a class wn_jax does not know), keeps
the tensor's name and PyTorch layout: ``<name>`` (v) and ``<name>_scale`` (g, one entry per
index of PyTorch's ``dim``); an Embedding's is named ``embedding``.

:func:`from_torch` turns them into the parameters of wn_jax's WN layers (``kernel`` =
v in Flax layout, ``scale`` = g, ``bias``) and says how each layer must be configured
(``axis``, ``transpose_kernel``, and, from a torch module, its PyTorch arguments).
:func:`to_linen` and :func:`to_nnx` convert a whole model, every tensor, into a linen
``variables`` dict or an NNX pure dict named as the torch modules are;
:func:`to_torch` goes back from either, bit for bit.

Layouts (PyTorch -> Flax kernel):

| PyTorch layer | PyTorch weight | Flax kernel | default `dim=0` |
|---|---|---|---|
| Linear | `(out, in)` | `(in, out)` | `axis=-1` (out) |
| Conv{1,2,3}d | `(out, in/groups, *k)` | `(*k, in/groups, out)` | `axis=-1` (out) |
| ConvTranspose{1,2,3}d | `(in, out, *k)` | `(*k, out, in)` with `transpose_kernel=True` | `axis=-1` (in) |

PyTorch's ``dim`` counts PyTorch's axes; its ``dim=None`` and ``dim=-1`` both mean the
whole tensor (a scalar g), which is wn_jax's ``axis=None``. Arguments of the layers
(:func:`conv_kwargs` does this mapping):

| PyTorch | Flax `WNConv` / `WNConvTranspose` |
|---|---|
| `stride` | `strides` |
| `padding=p` | Conv: `padding=[(p, p), ...]`; `'same'` / `'valid'` as they are |
| `dilation` | `kernel_dilation` |
| `groups` | Conv: `feature_group_count` (ConvTranspose: only `groups=1`) |
| `output_padding=op` | ConvTranspose: `padding=[(d(k-1)-p, d(k-1)-p+op), ...]` and `transpose_kernel=True` (a Conv refuses it) |
| `padding_mode` | Conv: `'reflect'` / `'circular'` -> `'REFLECT'` / `'CIRCULAR'` where `p` is half the dilated kernel; else refused |

Inputs are channels-last in Flax: a PyTorch ``(N, C, L)`` batch is ``x.transpose(0, 2, 1)``.

"Exactly" means: every tensor goes to Flax and back bit for bit (float32, float16, bfloat16,
any ``dim``); outputs in float32 match PyTorch's to float32 rounding (the order of sums
differs); in bfloat16, wn_jax's ``w = g v / ||v||`` is the float32-reduced value rounded once,
which PyTorch's equals for ``dim=0`` and the last ``dim``, while for ``dim=None`` and every
``dim`` in between (1 of a Conv1d, 1 and 2 of a Conv2d, 1 to 3 of a Conv3d) PyTorch reduces in
bfloat16 and part of its entries differ by one or two bfloat16 steps (the porting guide gives
the measurements).
"""

from wn_jax.pytorch._conv import conv_kwargs
from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._kinds import PLAIN_KINDS
from wn_jax.pytorch._kinds import TORCH_ARGS
from wn_jax.pytorch._layer import TorchLayer
from wn_jax.pytorch._layer import from_torch
from wn_jax.pytorch._model import layer_axes
from wn_jax.pytorch._model import to_linen
from wn_jax.pytorch._model import to_nnx
from wn_jax.pytorch._plan import Rule as Rule  # a type, not in __all__: pytorch.Rule
from wn_jax.pytorch._to_torch import to_torch
from wn_jax.pytorch._walk import find_prefixes

__all__ = [
  'KINDS',
  'PLAIN_KINDS',
  'TORCH_ARGS',
  'TorchLayer',
  'conv_kwargs',
  'find_prefixes',
  'from_torch',
  'layer_axes',
  'to_linen',
  'to_nnx',
  'to_torch',
]
