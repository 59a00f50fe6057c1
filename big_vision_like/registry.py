"""Explicit name -> class registries, so a typo in a config names the valid choices."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A problem with the user's config or inputs, reported as one line."""


def first_line(error: BaseException, limit: int = 300) -> str:
  """An exception's message cut to its first line, for one-line reports of
  libraries' multi-line errors (its type's name when it has no message)."""
  text = str(error).strip()
  return text.splitlines()[0][:limit] if text else type(error).__name__


class Registry(Generic[T]):
  """A dict from name to class or factory, with errors that list the choices."""

  def __init__(self, kind: str, field: str):
    self.kind = kind  # e.g. 'model'
    self.field = field  # the config field that picks it, e.g. 'config.model.name'
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} registered twice")
      self._entries[name] = obj
      return obj
    return decorator

  def names(self) -> list[str]:
    return sorted(self._entries)

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise ConfigError(
          f"{self.field}={name!r} is not a known {self.kind}; "
          f"valid names: {', '.join(self.names())}")
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def build(self, name: str, kwargs: dict[str, Any], field: str | None = None,
            **extra) -> Any:
    """Instantiates `name` with config kwargs, naming any unknown keyword.

    `extra` arguments come from the code, not the config, so they are not
    offered as config fields.
    """
    factory = self.get(name)
    check_kwargs(factory, kwargs, field or self.field.rsplit(".", 1)[0],
                 what=f"{self.kind} {name!r}", skip=("rngs", "config", *extra))
    return factory(**kwargs, **extra)


def check_kwargs(factory: Callable, kwargs: dict[str, Any], field: str,
                 what: str, skip: tuple[str, ...] = ("rngs",)) -> None:
  """Raises ConfigError naming config fields that `factory` does not accept."""
  params = _parameters(factory)
  if params is None:
    return
  accepted = [n for n, p in params.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip]
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ConfigError(
        f"{field}.{unknown[0]} is not a field of {what}; "
        f"valid fields: {', '.join(accepted)}")


def _parameters(factory: Callable) -> dict[str, inspect.Parameter] | None:
  """Keyword parameters of a function or class; a subclass's **kwargs adds its
  parents' (None when they stay open-ended)."""
  if not inspect.isclass(factory):
    params = dict(inspect.signature(factory).parameters)
    return None if any(p.kind == p.VAR_KEYWORD for p in params.values()) else params
  params = {}
  for cls in factory.__mro__:
    if "__init__" not in vars(cls):
      continue
    own = dict(inspect.signature(vars(cls)["__init__"]).parameters)
    own.pop("self", None)
    params.update({k: v for k, v in own.items() if k not in params})
    if not any(p.kind == p.VAR_KEYWORD for p in own.values()):
      return {k: v for k, v in params.items() if v.kind != v.VAR_KEYWORD}
  return None
