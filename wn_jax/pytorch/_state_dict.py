"""PyTorch state dicts: loading them, their arrays bit for bit, their key styles."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

_STYLES = ('legacy', 'parametrization')


def _error(msg: str) -> ValueError:
  """The package's error: the message, labelled ``wn_jax.pytorch:``."""
  return ValueError(f'wn_jax.pytorch: {msg}')


def _is_module(x: Any) -> bool:
  """A torch ``nn.Module``, duck typed (torch is never imported here)."""
  return hasattr(x, 'named_modules') and hasattr(x, 'state_dict') and not isinstance(x, Mapping)


# torch's wrappers of a model, and the attribute that holds it (its keys' prefix).
_WRAPPERS = {'OptimizedModule': '_orig_mod', 'DataParallel': 'module'}
_WRAPPERS['DistributedDataParallel'] = 'module'


def _unwrap(source: Any) -> tuple[Any, str]:
  """(the model, the key prefix) of a ``torch.compile`` / ``DataParallel`` / DDP wrapper
  (``'_orig_mod.'``, ``'module.'``); anything else as it is, with ``''``."""
  prefix = ''
  while _is_module(source) and hasattr(source, _WRAPPERS.get(type(source).__name__, ' ')):
    attr = _WRAPPERS[type(source).__name__]
    source, prefix = getattr(source, attr), f'{prefix}{attr}.'
  return source, prefix


def wrapper_hint(keys: Iterable[str], whose: str = 'the state dict') -> str:
  """What to do where every key carries a wrapper's prefix (a state dict saved from it)."""
  keys = list(keys)
  for attr in dict.fromkeys(_WRAPPERS.values()):
    if keys and all(k.startswith(f'{attr}.') for k in keys):
      who = 'torch.compile' if attr == '_orig_mod' else 'DataParallel / DDP'
      return (
        f"every key of {whose} starts with '{attr}.', as a {who} wrapper saves them: strip it "
        f"({{k.removeprefix('{attr}.'): v for k, v in sd.items()}}), or pass the wrapped "
        'module, which wn_jax unwraps'
      )
  return ''


def _refuse_torchscript(module: Any) -> None:
  """A ``ValueError`` for a TorchScript module (or one holding one): it says no layer kinds."""
  named = module.named_modules() if hasattr(module, 'named_modules') else [('', module)]
  for prefix, m in named:  # one holding no tensors (a scripted activation) reads nothing wrong
    scripted = any(cls.__name__ == 'ScriptModule' for cls in type(m).__mro__)
    if scripted and (not prefix or len(m.state_dict())):
      where = f'at {prefix!r} ' if prefix else ''
      raise _error(
        f'got a TorchScript module {where}({type(m).__name__}, from torch.jit.script, trace '
        'or load), whose submodules do not say their layer kinds or weight norm (its '
        'weight_g / weight_v would be read as plain tensors): pass the original torch module, '
        'or its state_dict() (converted as a bare state dict: kinds= where shapes cannot tell).'
      )


def _load(source: Any) -> Mapping[str, Any]:
  """The state dict of a torch module, a mapping (as it is) or a ``.safetensors`` path."""
  if _is_module(source):
    _refuse_torchscript(source)
    return source.state_dict()
  if isinstance(source, (str, os.PathLike)):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise _error(
        'reading a .safetensors file needs the safetensors package: pip install "wn_jax[safetensors]".'
      ) from e
    return load_file(os.fspath(source))
  if not isinstance(source, Mapping):
    raise _error(
      'expected a state dict (a mapping of key -> array), a .safetensors path or a torch '
      f'module; got {type(source).__name__}.'
    )
  nests = [k for k, v in source.items() if isinstance(v, Mapping) and not _is_extra_state(k)]
  found = [k for k in nests if _is_state_dict(source[k])]  # in any order, the model's first
  model = next((k for k in found if k in ('model', 'state_dict')), next(iter(found), None))
  nested = model if model is not None else next(iter(nests), None)
  if model is not None:
    raise _error(
      f'expected a state dict, flat keys to arrays; {nested!r} holds one (keys '
      f'{list(source[nested])[:3]}): this looks like a training checkpoint ({list(source)[:4]}). '
      f"Pass ckpt[{nested!r}], the model's state dict."
    )
  if nested is not None:
    raise _error(
      f"expected a state dict, flat keys ('fc.weight_v') to arrays; {nested!r} holds a dict "
      '(linen variables or an NNX pure dict?). wn_jax.pytorch.to_torch converts those to a '
      'state dict.'
    )
  return source


def _is_state_dict(x: Mapping[str, Any]) -> bool:
  """A torch state dict: dotted keys to arrays (not linen variables or an NNX pure dict)."""
  values = list(x.values())
  return bool(values) and all(map(_is_array, values)) and any('.' in str(k) for k in x)


def _is_extra_state(key: str) -> bool:
  """A key of torch's ``get_extra_state()`` object: ``_extra_state`` or ``<prefix>._extra_state``."""
  return _split(key)[1] == '_extra_state'


def _is_array(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def refuse_a_non_array(key: str, value: Any) -> None:
  """A ``ValueError`` for a state-dict value that is not an array: Flax has no place for it."""
  if _is_array(value):
    return
  extra = _is_extra_state(key)
  why = ": a module's get_extra_state() puts its non-tensor state there" if extra else ''
  pattern = r'(.*\.)?_extra_state' if extra else re.escape(key)
  then = (
    ", which load_state_dict hands to the module's set_extra_state (keeping it up to date is yours)"
    if extra
    else ''
  )
  raise _error(
    f'{key!r} holds a {type(value).__name__}, not an array{why}, and a Flax tree holds arrays '
    f"only. Leave it out with drop=r'{pattern}': to_torch given the same drop= gives back "
    f"like's {key!r} as it is{then}."
  )


def _is_meta(x: Any) -> bool:
  """A torch tensor on the meta device: a shape and a dtype, no data."""
  return getattr(x, 'is_meta', False) is True


def refuse_meta(state_dict: Mapping[str, Any]) -> None:
  """A ``ValueError`` for a source on the meta device: it has no values to convert."""
  meta = [k for k, v in state_dict.items() if _is_meta(v)]
  if meta:
    more = f' and {len(meta) - 1} more are' if len(meta) > 1 else ' is'
    raise _error(
      f'{meta[0]!r}{more} on the meta device, with no values to convert: load the weights '
      "into the module first (module.to_empty(device='cpu'), then load_state_dict). A meta "
      "module serves as to_torch's like= (it reads its keys, shapes and dtypes only)."
    )


def _array(x: Any, dtype: Any = None) -> np.ndarray:
  """A NumPy copy of ``x`` (NumPy, JAX or torch), bit for bit, bfloat16 included.

  ``dtype`` casts floating arrays (``None``: keep their dtype).
  """
  if _is_meta(x):  # no data (like= of to_torch): its shape and dtype serve
    x = x.new_zeros(tuple(x.shape), device='cpu')
  if hasattr(x, 'detach'):  # a torch tensor, without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':  # NumPy has no bfloat16: via float32, exactly
      x = x.float().numpy().astype(ml_dtypes.bfloat16)
    else:
      x = x.numpy()
  out = np.array(x, copy=True)
  if dtype is not None and _is_float(out):
    out = out.astype(dtype)
  return out


def _jax(value: Any, key: str) -> Any:
  """``value`` as a JAX array, refusing the 64-bit floats JAX would round to 32 bits and the
  64-bit integers it would wrap (those outside the 32-bit type; the others convert exactly)."""
  import jax

  dtype = np.asarray(value).dtype if not hasattr(value, 'dtype') else np.dtype(value.dtype)
  narrow = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
  x64 = "enable x64 with jax.config.update('jax_enable_x64', True)"
  if dtype in (np.float64, np.complex128) and narrow != dtype:
    raise _error(
      f'{key!r} is {dtype}, which JAX without x64 would round to 32 bits (and to_torch could '
      f'not give back bit for bit): {x64}, or convert to float32 (module.float() in PyTorch, '
      'or dtype=np.float32 here).'
    )
  if dtype in (np.int64, np.uint64) and narrow != dtype:
    a, info = np.asarray(value), np.iinfo(narrow)
    if a.size and (a.min() < info.min or a.max() > info.max):
      raise _error(
        f'{key!r} is {dtype} with values in [{a.min()}, {a.max()}], beyond {narrow}, which JAX '
        f'without x64 would wrap them to (and to_torch give back wrong): {x64}, or leave it '
        'out with drop= (to_torch given the same drop= copies it back from like).'
      )
  return jnp.array(value)


def _is_float(x: Any) -> bool:
  return bool(jnp.issubdtype(x.dtype, jnp.floating))


def _suffixes(style: str, tensor: str = 'weight') -> tuple[str, str]:
  """The ``g`` and ``v`` key suffixes of weight norm on the tensor ``tensor`` in ``style``."""
  if style == 'legacy':
    return f'.{tensor}_g', f'.{tensor}_v'
  return f'.parametrizations.{tensor}.original0', f'.parametrizations.{tensor}.original1'


_NAMED = {
  'legacy': re.compile(r'(?:(.*)\.)?(\w+)_([gv])'),
  'parametrization': re.compile(r'(?:(.*)\.)?parametrizations\.(\w+)\.original([01])'),
}


def _weight_normed(state_dict: Mapping[str, Any]) -> dict[tuple[str, str], str]:
  """``{(module prefix, tensor name): style}`` of every weight-normed tensor, in key order.

  A tensor ``w`` is weight-normed when both of its keys are there: ``w_g`` and ``w_v``, or
  ``parametrizations.w.original0`` and ``original1``; for a name other than ``weight``,
  the legacy ``g`` must also have ``v``'s rank (or be a scalar), so that two unrelated
  tensors ``x_g``, ``x_v`` are not taken for one. Refused where a tensor has a second weight
  (:func:`refuse_a_second_weight`) or has other parametrizations (:func:`refuse_a_chain`); with a torch module or ``drop=``, the converters decide
  with :func:`wn_jax.pytorch._walk.weight_normed_here`.
  """
  found = detected(state_dict, state_dict.__contains__)
  for prefix, tensor in found:
    refuse_a_second_weight(state_dict.__contains__, prefix, tensor)
    refuse_a_chain(state_dict, prefix, tensor)
  return found


def detected(
  state_dict: Mapping[str, Any], present: Callable[[str], bool]
) -> dict[tuple[str, str], str]:
  """:func:`_weight_normed`'s finding, of the keys ``present`` keeps, without its refusal."""
  found: dict[tuple[str, str], str] = {}
  for key in filter(present, state_dict):
    for style, pattern in _NAMED.items():
      match = pattern.fullmatch(key)
      if match is None:
        continue
      prefix, tensor = match.group(1) or '', match.group(2)
      g_key, v_key = (_key(prefix, s) for s in _suffixes(style, tensor))
      if tensor == 'weight' and present(_key(prefix, '.weight_orig')) and not present(g_key):
        continue  # spectral norm's weight_u / weight_v beside its weight_orig
      if tensor == 'weight':  # a complete pair before a lone key (an attention's own weight_v)
        old = found.get((prefix, tensor))
        if old is None or (
          present(g_key) and present(v_key) and not _complete(present, prefix, old)
        ):
          found[prefix, tensor] = style
      elif present(g_key) and present(v_key):
        g, v = state_dict[g_key], state_dict[v_key]
        if style == 'parametrization' or len(g.shape) in (0, len(v.shape)):
          found.setdefault((prefix, tensor), style)
  return found


def _complete(present: Callable[[str], bool], prefix: str, style: str) -> bool:
  """Whether both keys of ``weight``'s pair in ``style`` at ``prefix`` are ``present``."""
  return all(present(_key(prefix, s)) for s in _suffixes(style))


def refuse_a_second_weight(present: Callable[[str], bool], prefix: str, tensor: str) -> None:
  """A ``ValueError`` where a weight-normed tensor has its pair and a key of the other style,
  or its pair and a plain tensor: weight norm keeps one pair and no plain tensor, so the others
  are the module's own tensors or strays, which a state dict alone does not tell apart."""
  keys = {style: [_key(prefix, s) for s in _suffixes(style, tensor)] for style in _NAMED}
  pairs = [k for k in keys.values() if all(map(present, k))]
  found = [key for k in keys.values() for key in k if present(key)]
  plain = _key(prefix, f'.{tensor}')
  fix = (
    "If some are a module's own tensors (an attention's weight_v), pass the torch module, "
    'which tells; else remove the keys that are not the weight from the state dict '
    '(to_linen / to_nnx: or drop= them).'
  )
  if pairs and len(found) > 2:
    raise _error(
      f'{_layer_key(prefix, tensor)!r} has keys of both weight-norm styles, {found} '
      f'(torch.nn.utils.weight_norm keeps {tensor}_g / _v, torch.nn.utils.parametrizations.'
      f'weight_norm parametrizations.{tensor}.original0 / 1), and a weight-normed tensor has '
      f'one pair. {fix}'
    )
  if pairs and present(plain):
    raise _error(
      f'{plain!r} is beside the weight-normed pair {pairs[0][0]!r}, {pairs[0][1]!r}; a '
      f'weight-normed module keeps no plain {tensor!r} (PyTorch computes it from the pair). '
      f'{fix}'
    )


def refuse_a_chain(keys: Iterable[str], prefix: str, tensor: str) -> None:
  """A ``ValueError`` where weight-normed ``tensor`` has the state of further parametrizations
  (``parametrizations.<tensor>.1.alpha``, spectral norm's ``1._u``): torch computes the tensor
  through all of them. A stateless one leaves no key: only the module tells it."""
  head = _key(prefix, f'.parametrizations.{tensor}.')
  others = [k for k in keys if k.startswith(head) and k[len(head) :].split('.')[0].isdigit()]
  if others:
    raise chain_error(prefix, tensor, f'parametrizations after weight norm (keys {others[:4]})')


def refuse_a_normed_bias(prefix: str, tensor: str, keys: list[str]) -> None:
  """A ``ValueError`` for weight norm on a tensor named ``bias`` (``keys``: its g and v): its v
  would take the name of the layer's plain ``bias``, which Flax layers read as the bias itself."""
  if tensor == 'bias':
    raise _error(
      f"{_key(prefix, '.bias')!r} is weight-normed (weight_norm(module, name='bias')), which "
      "wn_jax does not convert: a Flax layer's 'bias' is the plain bias, and v would take its "
      'name. Take weight norm off the bias first (torch.nn.utils.remove_weight_norm(module, '
      "name='bias'), or torch.nn.utils.parametrize.remove_parametrizations(module, 'bias') "
      f'for the parametrization; the bias keeps its value), or leave its keys {keys} out with '
      'drop= (to_torch given the same drop= copies them back from like). If they are tensors '
      "of the model's own, not weight norm, pass the torch module, which tells."
    )


def half_a_pair(state_dict: Mapping[str, Any], key: str) -> ValueError:
  """The error for the ``g`` or ``v`` ``key`` of a weight-normed tensor missing from ``state_dict``."""
  prefix, name = _split(key)
  head = _key(prefix, f'.parametrizations.{name}.')
  held = [k for k in state_dict if k.startswith(head)]
  if held:  # legacy weight_norm's weight_v, then a parametrization on it
    return _error(
      f"{key!r} is itself parametrized (keys {held[:3]}): wn_jax reads weight norm's g and v "
      'as plain tensors. Fold its parametrizations into it first '
      f'(torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})), or convert '
      'the plain weights.'
    )
  return _error(
    f'{key!r} is missing: a weight-normed layer needs both g and v. If the other is a '
    "tensor of the model's own (an attention's weight_v, no weight norm), pass the torch "
    'module, which tells, or drop= its keys.'
  )


def chain_error(prefix: str, tensor: str, found: str) -> ValueError:
  """The error for weight-normed ``tensor`` at ``prefix`` with other parametrizations too."""
  return _error(
    f'{repr(prefix) if prefix else "the module"}: its {tensor!r} has {found}, and wn_jax '
    'converts weight norm alone (torch computes the tensor through every parametrization). '
    'Fold the others into the tensor first: take them off with '
    'torch.nn.utils.parametrize.remove_parametrizations, or convert the plain weights.'
  )


def _layer_key(prefix: str, tensor: str) -> str:
  """A weight-normed tensor's key among the layers: its module's prefix for ``weight``,
  else ``prefix.tensor`` (a module may weight-norm several tensors)."""
  return prefix if tensor == 'weight' else _key(prefix, f'.{tensor}')


def find_prefixes(state_dict: Mapping[str, Any]) -> dict[str, str]:
  """Every weight-normed prefix in ``state_dict`` and its key style.

  The prefix is the module's for a weight-normed ``weight``, and ``<module>.<name>`` for
  weight norm on another tensor (``weight_norm(lstm, name='weight_hh_l0')``: keys
  ``weight_hh_l0_g`` / ``_v`` or ``parametrizations.weight_hh_l0.original0`` / ``1``).

  Examples:
    >>> import numpy as np
    >>> find_prefixes({'a.weight_g': np.ones(1), 'b.parametrizations.weight.original1': np.ones(1)})
    {'a': 'legacy', 'b': 'parametrization'}
    >>> find_prefixes({'lstm.w_hh_g': np.ones((1, 3)), 'lstm.w_hh_v': np.ones((4, 3))})
    {'lstm.w_hh': 'legacy'}
  """
  return layer_keys(_weight_normed(state_dict))


def layer_keys(found: dict[tuple[str, str], str]) -> dict[str, str]:
  """``{layer key: style}`` of :func:`_weight_normed`'s ``found``."""
  return {_layer_key(p, t): s for (p, t), s in found.items()}


def _key(prefix: str, suffix: str) -> str:
  """``prefix + suffix``; a top-level module's keys have no prefix and no dot."""
  return prefix + suffix if prefix else suffix[1:]


def _split(key: str) -> tuple[str, str]:
  """``'a.b.weight'`` -> ``('a.b', 'weight')``."""
  prefix, _, leaf = key.rpartition('.')
  return prefix, leaf


def _like(ref: Any, value: np.ndarray, key: str, hint: str = '') -> Any:
  """``value`` as ``ref`` is: a torch tensor of its dtype and device, or a NumPy array of its dtype."""
  if tuple(ref.shape) != value.shape:
    raise _error(
      f'{key!r}: like has shape {tuple(ref.shape)}, the converted value {value.shape}. {hint}'
    )
  if hasattr(ref, 'new_tensor'):  # torch, without importing it
    if value.dtype.kind == 'V':  # ml_dtypes' bfloat16, float8: torch reads no such NumPy array
      value = value.astype(np.float32)  # exact; new_tensor casts back to ref's dtype
    return ref.new_tensor(value, device='cpu') if _is_meta(ref) else ref.new_tensor(value)
  return np.asarray(value).astype(np.asarray(ref).dtype, copy=False)


def _finish(
  out: dict[str, np.ndarray], like: Any, skipped: set[str], hint: str = ''
) -> dict[str, Any]:
  """``out`` in the order, types and dtypes of ``like``'s state dict; ``skipped`` keys from ``like``."""
  if like is None:
    return out
  ref = _load(like)
  extra = [k for k in out if k not in ref]
  missing = [k for k in ref if k not in out and k not in skipped]
  if extra or missing:
    raise _error(
      f"the converted keys do not match like's state dict: missing {missing}, unexpected {extra}. "
      f'{hint}'
    )
  source = {**{k: k for k in out}, **_tied(ref, out)}  # like's key -> the converted key it takes
  empty = [k for k in ref if k not in source and _is_meta(ref[k])]
  if empty:
    raise _error(
      f"like's {empty} are on the meta device, with no values, and to_torch copies them from "
      "like (the tree holds none for them: drop='s keys, BatchNorm's num_batches_tracked, the "
      "tensors outside from_torch's layers): pass a like whose tensors hold values, or set "
      'these after loading.'
    )
  return {k: _like(ref[k], out[source[k]], k, hint) if k in source else _copy(ref[k]) for k in ref}


def _tied(ref: Mapping[str, Any], out: Mapping[str, Any]) -> dict[str, str]:
  """``{key: the converted key it shares its tensor with}`` for ``like``'s keys left out of
  ``out`` (a module registered under two names, tied weights): they take the converted
  value, not ``like``'s old one, which loading would write over the converted tensor."""

  def tensor(x: Any) -> Any:
    # torch: the same storage, offset and view (a meta tensor has no storage)
    if hasattr(x, 'data_ptr') and x.numel() and not _is_meta(x):
      return ('torch', x.data_ptr(), tuple(x.shape), tuple(x.stride()))
    return id(x)

  converted = {tensor(ref[k]): k for k in out if k in ref}
  return {k: converted[tensor(ref[k])] for k in ref if k not in out and tensor(ref[k]) in converted}


def _copy(x: Any) -> Any:
  """A copy of like's ``x``; an object that is no array (``get_extra_state()``'s) as it is."""
  if hasattr(x, 'clone'):
    return x.clone()
  return np.array(x, copy=True) if _is_array(x) else x
