"""Whole PyTorch models, every tensor, as linen variables or an NNX pure dict."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from wn_jax.pytorch._fit import _check
from wn_jax.pytorch._kinds import KINDS
from wn_jax.pytorch._layer import _layers
from wn_jax.pytorch._layer import _module_prefix
from wn_jax.pytorch._naming import _layers_mover
from wn_jax.pytorch._naming import _linen_path
from wn_jax.pytorch._naming import _nest
from wn_jax.pytorch._naming import _path
from wn_jax.pytorch._plan import Rule
from wn_jax.pytorch._plan import _Options
from wn_jax.pytorch._plan import _outputs
from wn_jax.pytorch._plan import _plan
from wn_jax.pytorch._state_dict import _array
from wn_jax.pytorch._state_dict import _error
from wn_jax.pytorch._state_dict import _is_module
from wn_jax.pytorch._state_dict import _jax
from wn_jax.pytorch._state_dict import _key
from wn_jax.pytorch._state_dict import _split
from wn_jax.pytorch._state_dict import _unwrap
from wn_jax.pytorch._state_dict import refuse_meta
from wn_jax.pytorch._state_dict import wrapper_hint
from wn_jax.pytorch._twin import _check_plain_convs
from wn_jax.pytorch._twin import _check_twin_layers
from wn_jax.pytorch._twin import _twin


def _to_tree(
  source: Any, naming: str, options: _Options, template: Any, twin: Any
) -> dict[Any, Any]:
  """Every tensor of ``source`` in a linen (``naming='linen'``) or NNX tree."""
  source = _unwrap(source)[0]
  if twin is not None and template is not None:
    raise _error(
      'pass twin= or template=, not both: twin= checks the names, shapes and kept axes '
      '(its variables are the template), template= the names and shapes only.'
    )
  sd, infos, layers, leaves, _ = _plan(source, options)
  refuse_meta(sd)
  flat: dict[tuple[Any, ...], Any] = {}
  where: dict[tuple[Any, ...], str] = {}

  def put(path: tuple[Any, ...], value: Any, key: str) -> None:
    if path in flat:
      raise _error(f'{where[path]!r} and {key!r} both convert to {"/".join(map(str, path))}.')
    flat[path], where[path] = _jax(value, key), key

  for key, layer in layers.items():
    prefix = _module_prefix(key, layer)
    for name, value in layer.params.items():
      put(_path(prefix, name, 'params', naming), value, _key(prefix, '.' + name))
  for leaf in leaves:
    converted = leaf.forward(_array(sd[leaf.key], options.dtype))
    for (prefix, name), value in _outputs(leaf, converted).items():
      put(_path(prefix, name, leaf.collection, naming), value, leaf.key)
  found, inputs = None, None
  if twin is not None:
    template, found = _twin(twin, naming)
    inputs = twin[1:] if naming == 'linen' else None
  if template is not None:
    # torch's nn.Sequential children go where the model has a Flax Sequential's.
    move = _layers_mover(template, naming)
    if found is not None:
      known = {p for p in layers if _is_module(source) or p in (options.kinds or {})}
      _check_twin_layers(layers, found, naming, move, known)
      _check_plain_convs(sd, infos, found, naming, move)
    flat = {move(path): value for path, value in flat.items()}
    unsaved = _unsaved(source, sd, options, naming, move)
    _check(flat, template, layers, naming, inputs, move, unsaved, wrapper_hint(sd))
  return _nest(flat)


def _unsaved(
  source: Any, sd: Mapping[str, Any], options: _Options, naming: str, move: Any
) -> set[str]:
  """The tree paths a torch module's ``persistent=False`` buffers would have, in either
  collection: no state dict holds them."""
  if not _is_module(source) or not hasattr(source, 'named_buffers'):
    return set()
  prefixes = [_split(k) for k, _ in source.named_buffers() if k not in sd]
  collections = (options.buffers, 'params')
  return {'/'.join(map(str, move(_path(*p, c, naming)))) for p in prefixes for c in collections}


def to_linen(
  source: Any,
  kinds: Mapping[str, str] | None = None,
  *,
  rules: Mapping[str, Rule] | None = None,
  decompose: bool | str = False,
  dtype: Any = None,
  template: Any = None,
  twin: Any = None,
  buffers: str = 'buffers',
  drop: str | None = None,
  buffer_keys: str | None = None,
) -> dict[str, Any]:
  """A whole PyTorch model's tensors as linen ``variables``: ``model.apply(variables, x)``.

  Weight-normed layers become ``kernel`` (v in Flax layout), ``scale`` (g) and ``bias``
  (build them as ``WNConv`` / ``WNConvTranspose(transpose_kernel=True)`` / ``WNDense``
  with the ``axis`` :func:`from_torch` gives, ``-1`` for PyTorch's default ``dim=0``);
  plain Linear / Conv ``weight`` -> ``kernel`` in Flax layout; norm layers' ``weight``
  -> ``scale``, ``running_mean`` / ``running_var`` -> ``batch_stats`` ``mean`` / ``var``;
  Embedding ``weight`` -> ``embedding``; any other tensor keeps its name and layout
  (unless a ``rules`` entry says otherwise), as does every tensor of a module class
  wn_jax does not know when ``source`` is the module (a bare state dict's ``weight`` is
  read by its rank: 2-D a Linear, 3-D a Conv1d, ...; ``kinds`` overrides). Module names follow linen's for lists of
  submodules assigned in ``setup``: ``resblocks.0.convs1.1`` -> ``resblocks_0/convs1_1``.
  With ``twin`` or ``template``, the children of a torch ``nn.Sequential`` take linen's
  ``nn.Sequential`` names where the model has one: ``body.0`` -> ``body/layers_0``.

  Args:
    source: a torch module (preferred: the kinds and weight norm ``dim`` come from
      it; duck typed, torch is not imported), a state dict or a ``.safetensors`` path.
    kinds: as :func:`from_torch`: the kind of prefixes whose shape cannot tell it (not
      needed with a module); also ``'Embedding'``, ``'LayerNorm'``, ``'BatchNorm1d'`` ...
      for plain layers of a state dict.
    rules: ``{regex: (forward, inverse)}`` for model-specific tensors: a key that
      ``re.fullmatch``es a regex keeps its name, and its value becomes
      ``forward(array)``; :func:`to_torch` applies ``inverse``. E.g. a Snake activation's
      ``alpha`` of shape ``(1, C, 1)``:
      ``{r'.*\\.alpha': (lambda a: a.reshape(-1), lambda a: a.reshape(1, -1, 1))}``.
      ``forward`` may instead return a dict of several leaves, named relative to the
      tensor's module and dotted as PyTorch keys (``{'cell.ii.kernel': ..., ...}``, so a
      list index follows linen's or NNX's naming); ``inverse`` then takes that dict back
      to the one tensor (torch's ``nn.LSTM`` onto per-gate Flax cells, say). Anything
      else raises, naming the key.
    buffers: the linen collection torch buffers (``register_buffer``: a mel ``mean``, a
      codebook's ``cluster_size``) go to, read from a torch module (a state dict cannot
      tell them from parameters): ``'buffers'`` by default, so an optimizer of
      ``params`` never trains them; ``'params'`` puts them with the parameters. Running
      statistics of norm layers go to ``batch_stats`` all the same. NNX's pure dict is
      one tree: declare them in the twin as a ``nnx.Variable`` type that is not a
      ``nnx.Param``.
    buffer_keys: a regex: keys that ``re.fullmatch`` it are buffers too, for a state dict
      or ``.safetensors`` file, which cannot tell (a module tells its own).
    drop: a regex; keys that ``re.fullmatch`` it are left out (a weight-normed layer
      whole), e.g. codebooks ``__call__`` never runs, which a template from
      ``jax.eval_shape(model.init, ...)`` lacks. :func:`to_torch` given the same ``drop``
      copies them back from ``like``.
    decompose: as :func:`from_torch`: plain Linear / Conv weights to WN ``(kernel,
      scale)`` (``True``, or a regex ``re.search``ed in the prefix, where ``rules``,
      ``drop`` and ``buffer_keys`` ``re.fullmatch`` the whole key).
    dtype: as :func:`from_torch`: cast the floating tensors to this floating dtype (NumPy's,
      JAX's or torch's; default: keep the checkpoint's).
    template: optional, the Flax model's own tree (e.g. ``jax.eval_shape`` of ``init``,
      or ``nnx.state(model)``): every converted name and shape is checked against it,
      and a mismatch raises with the missing and unexpected paths.
    twin: optional, ``(model, *inputs)``: the Flax model and inputs its ``init`` runs on
      (abstractly, nothing is computed). Its variables serve as ``template``, and each
      weight-normed layer's kept ``axis`` is checked against PyTorch's ``dim``, and its
      kind against PyTorch's layer, which shapes alone cannot always tell (wav2vec2's
      ``dim=2`` Conv1d with as many channels as window taps fits a twin left at
      ``axis=-1``; a ``ConvTranspose1d`` with as many inputs as outputs fits a ``WNConv``
      or a ``WNConvTranspose`` without ``transpose_kernel=True``: each computes wrong).

  Raises:
    ValueError: for a ``drop``, ``buffer_keys`` or ``rules`` pattern that matches no key
      (a typo would convert silently), listing the keys; for a float64 tensor with JAX's
      x64 off; for ``twin`` and ``template`` both given; for a tree that does not fit the
      ``template`` / ``twin``, naming the paths and the fix.

  Returns:
    ``{'params': ...}``, plus ``'batch_stats'`` when the model has running statistics;
    JAX arrays, copied.

  Examples:
    >>> import numpy as np
    >>> from wn_jax import pytorch
    >>> sd = {'blocks.0.weight_g': np.ones((4, 1, 1), np.float32),
    ...       'blocks.0.weight_v': np.ones((4, 2, 3), np.float32),
    ...       'blocks.0.bias': np.zeros(4, np.float32), 'head.weight': np.ones((1, 4), np.float32)}
    >>> variables = pytorch.to_linen(sd)
    >>> {k: v.shape for k, v in variables['params']['blocks_0'].items()}
    {'kernel': (3, 2, 4), 'scale': (4,), 'bias': (4,)}
    >>> variables['params']['head']['kernel'].shape
    (4, 1)
  """
  options = _Options(kinds, rules, decompose, dtype, buffers, drop, buffer_keys)
  return _to_tree(source, 'linen', options, template, twin)


def to_nnx(
  source: Any, kinds: Mapping[str, str] | None = None, *, twin: Any = None, **options: Any
) -> dict[Any, Any]:
  """A whole PyTorch model's tensors as an NNX pure dict, for ``nnx.replace_by_pure_dict``.

  The same conversion as :func:`to_linen`, in one tree (running statistics under
  their NNX names ``mean`` / ``var``), with a torch ``nn.ModuleList`` index as an integer
  key: ``resblocks.0.convs1.1`` -> ``['resblocks'][0]['convs1'][1]``, the path of an
  ``nnx.List`` of submodules. With ``twin`` or ``template``, the children of a torch
  ``nn.Sequential`` go under ``layers`` where the model has an ``nnx.Sequential``. Load it with
  ``state = nnx.state(model); nnx.replace_by_pure_dict(state, tree); nnx.update(model, state)``.

  Args:
    source: as :func:`to_linen`.
    kinds: as :func:`to_linen`.
    twin: optional, the NNX model itself (any parameter values): as ``template=nnx.state(twin)``,
      and each weight-normed layer's kept ``axis`` is checked against PyTorch's ``dim``
      (see :func:`to_linen`).
    **options: every other keyword of :func:`to_linen` (``rules``, ``decompose``, ``dtype``,
      ``template``, ``buffers``, ``drop``, ``buffer_keys``), with its meaning and default
      (one signature, to_linen's, holds them; an unknown keyword is a ``TypeError``).

  Returns:
    A nested dict of JAX arrays (copied).

  Examples:
    >>> import numpy as np
    >>> from flax import nnx
    >>> import wn_jax
    >>> from wn_jax import pytorch
    >>> sd = {'layers.0.weight_g': np.full((4, 1), 2.0, np.float32),
    ...       'layers.0.weight_v': np.ones((4, 3), np.float32), 'layers.0.bias': np.zeros(4, np.float32)}
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.layers = nnx.List([wn_jax.nnx.WNLinear(3, 4, rngs=rngs)])
    >>> model = Model(nnx.Rngs(0))
    >>> state = nnx.state(model)
    >>> nnx.replace_by_pure_dict(state, pytorch.to_nnx(sd, template=state))
    >>> nnx.update(model, state)
    >>> model.layers[0].scale[...].tolist()
    [2.0, 2.0, 2.0, 2.0]
  """
  try:
    bound = inspect.signature(to_linen).bind(source, kinds, twin=twin, **options)
  except TypeError as e:
    raise TypeError(f'wn_jax.pytorch.to_nnx: {e}') from None
  bound.apply_defaults()
  a = bound.arguments
  converting = _Options(
    a['kinds'], a['rules'], a['decompose'], a['dtype'], a['buffers'], a['drop'], a['buffer_keys']
  )
  return _to_tree(source, 'nnx', converting, a['template'], twin)


def layer_axes(
  source: Any, kinds: Mapping[str, str] | None = None, *, decompose: bool | str = False
) -> dict[str, int | None]:
  """Each weight-normed layer's kept ``axis``, keyed by its linen path, for ``linen.fold``.

  A converted layer's ``scale`` does not always tell its axis (a wav2vec2-style ``dim=2``
  Conv1d whose window equals its channel count fits ``axis=-1`` too), so fold a converted
  model with ``wn_jax.linen.fold(variables['params'], axis=layer_axes(torch_model))``. The
  paths are the converter's own names (``body_0``); a tree converted with ``twin=`` or
  ``template=`` takes the twin's (``body/layers_0`` for a Flax ``nn.Sequential``): fold it with
  ``axis=wn_jax.linen.layer_axes(twin, x)``, which reads the twin built as checked.

  Args:
    source: as :func:`to_linen`.
    kinds: as :func:`to_linen`.
    decompose: as :func:`to_linen`.

  Returns:
    ``{'/'-joined linen path: axis}`` for every weight-normed (or decomposed) Linear / Conv /
    ConvTranspose layer (a tensor kept in PyTorch's layout has no ``kernel`` to fold).

  Examples:
    >>> import numpy as np
    >>> sd = {'pos_conv.0.weight_g': np.ones((1, 1, 4), np.float32),
    ...       'pos_conv.0.weight_v': np.ones((4, 4, 4), np.float32)}
    >>> layer_axes(sd)
    {'pos_conv_0': -3}
  """
  _, _, layers = _layers(_unwrap(source)[0], kinds, decompose, None)
  return {
    '/'.join(_linen_path(prefix)): layer.axis
    for prefix, layer in layers.items()
    if layer.kind in KINDS  # the others keep PyTorch's names: no kernel / scale to fold
  }
