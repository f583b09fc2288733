"""PyTorch state dicts: loading them, and their arrays bit for bit (to and from torch)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np


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


def _torch() -> Any:
  """The torch module, for its dtypes (bfloat16 moves as int16 bits): imported wherever a
  torch tensor came from, so wn_jax never imports it."""
  return sys.modules['torch']


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
    if str(x.dtype) == 'torch.bfloat16':  # NumPy has no bfloat16: its bits, NaNs' included
      x = x.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
    else:
      x = x.numpy()
  out = np.array(x, copy=True)
  if dtype is not None and _is_float(out):
    out = out.astype(_floating(dtype))
  return out


def _floating(dtype: Any) -> np.dtype:
  """``dtype=``, the floating dtype the converters cast to: NumPy's, JAX's, ml_dtypes' or a
  torch dtype (``torch.bfloat16``, read by its name: torch is not imported)."""
  name = str(dtype)
  try:
    out = np.dtype(jnp.dtype(name.removeprefix('torch.') if name.startswith('torch.') else dtype))
  except TypeError:
    out = None
  if out is None or not jnp.issubdtype(out, jnp.floating):
    raise _error(
      'dtype= casts the floating tensors: expected a floating dtype (np.float32, jnp.bfloat16, '
      f'torch.float16, ...), got {dtype!r}.'
    )
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
  if isinstance(value, jax.Array):
    return jnp.array(value)  # a copy, on its device
  return jax.device_put(np.array(value, copy=True))  # jnp.array compiles a copy for each shape


def _is_float(x: Any) -> bool:
  return bool(jnp.issubdtype(x.dtype, jnp.floating))


def _key(prefix: str, suffix: str) -> str:
  """``prefix + suffix``; a top-level module's keys have no prefix and no dot."""
  return prefix + suffix if prefix else suffix[1:]


def _split(key: str) -> tuple[str, str]:
  """``'a.b.weight'`` -> ``('a.b', 'weight')``."""
  prefix, _, leaf = key.rpartition('.')
  return prefix, leaf


def _like(ref: Any, value: np.ndarray, key: str, hint: str = '') -> Any:
  """``value`` as ``ref`` is: a torch tensor of its dtype and device, or a NumPy array of its
  dtype; contiguous, as PyTorch's own state dict is (``safetensors`` saves no other)."""
  if tuple(ref.shape) != value.shape:
    raise _error(
      f'{key!r}: like has shape {tuple(ref.shape)}, the converted value {value.shape}. {hint}'
    )
  value = np.asarray(value, order='C')  # a transposed kernel: torch.tensor would keep its strides
  if hasattr(ref, 'new_tensor'):  # torch, without importing it
    cpu = {'device': 'cpu'} if _is_meta(ref) else {}  # a meta tensor's new tensors hold no data
    if value.dtype == ml_dtypes.bfloat16 and str(ref.dtype) == 'torch.bfloat16':  # its bits
      return ref.new_tensor(value.view(np.int16), dtype=_torch().int16, **cpu).view(ref.dtype)
    if value.dtype.kind == 'V':  # ml_dtypes' float8 ...: torch reads no such NumPy array
      value = value.astype(np.float32)  # exact; new_tensor casts back to ref's dtype
    return ref.new_tensor(value, **cpu)
  return value.astype(np.asarray(ref).dtype, copy=False)


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
