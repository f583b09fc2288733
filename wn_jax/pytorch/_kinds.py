"""The PyTorch layer kinds wn_jax converts, and their weights' layouts."""

from __future__ import annotations

# Layers whose weight becomes a Flax kernel (weight-normed or plain).
KINDS = (
  'Linear',
  'Conv1d',
  'Conv2d',
  'Conv3d',
  'ConvTranspose1d',
  'ConvTranspose2d',
  'ConvTranspose3d',
)
# PyTorch's own layer arguments; TorchLayer.linen/.nnx pass every other one to Flax.
TORCH_ARGS = ('stride', 'padding', 'dilation', 'groups', 'output_padding', 'padding_mode')
# A weight's kind by its rank, where nothing else tells (a state dict without its module).
_DEFAULT_KIND = {2: 'Linear', 3: 'Conv1d', 4: 'Conv2d', 5: 'Conv3d'}
# Layers whose tensors keep their layout, under Flax's names (scale, mean, var, embedding).
_NORMS = (
  'LayerNorm',
  'GroupNorm',
  'RMSNorm',
  'BatchNorm1d',
  'BatchNorm2d',
  'BatchNorm3d',
  'InstanceNorm1d',
  'InstanceNorm2d',
  'InstanceNorm3d',
)
PLAIN_KINDS = (*_NORMS, 'Embedding')


def _perm(kind: str, ndim: int) -> tuple[int, ...]:
  """PyTorch axis order -> Flax axis order: flax_kernel = torch_weight.transpose(perm)."""
  if kind == 'Linear':
    return (1, 0)
  return (*range(2, ndim), 1, 0)
