"""Boolean settings from configs and the command line: ``as_bool`` is the bundle's one parser of on/off values.

``python -m monai.bundle run ... --pictures false`` and the python-fire scripts (``--paper false``) pass the
string 'false', which Python treats as true. Every component that takes an on/off setting from a config reads it
through ``as_bool``; every fire script starts through ``fire_cli``, which reads its ``bool`` parameters the same
way; argparse scripts use ``type=argparse_bool``.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off", "none", "")


def as_bool(value) -> bool:
    """True/False from a bool, a number or a string such as 'true', 'False', '1', 'no' (anything else: error)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered not in TRUE + FALSE:
            raise ValueError(f"expected true or false, got {value!r}")
        return lowered in TRUE
    return bool(value)


def argparse_bool(text: str) -> bool:
    """``as_bool`` as an argparse ``type=``: a word it does not know is a usage error with its message."""
    import argparse

    try:
        return as_bool(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _is_bool_hint(hint) -> bool:
    """``bool``, ``bool | None`` or ``Optional[bool]``."""
    if hint is bool:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set(typing.get_args(hint)) == {bool, type(None)}
    return False


def bool_parameters(function) -> list[str]:
    """Names of the parameters of ``function`` that are on/off switches: annotated ``bool`` (or ``bool | None``),
    or not annotated and defaulting to True/False."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: fall back to its text
        hints = dict(getattr(function, "__annotations__", {}))
    names = []
    for name, parameter in inspect.signature(function).parameters.items():
        hint = hints.get(name, parameter.annotation)
        if isinstance(hint, str):
            flagged = hint.replace(" ", "") in ("bool", "bool|None", "None|bool", "Optional[bool]")
        elif hint is inspect.Parameter.empty:
            flagged = isinstance(parameter.default, bool)
        else:
            flagged = _is_bool_hint(hint)
        if flagged:
            names.append(name)
    return names


def coerce_bools(function):
    """Decorator: the switches of ``function`` (``bool_parameters``) go through ``as_bool``, so '--flag false'
    from python-fire means False; None stays None for ``bool | None``. Fire still sees the original signature."""
    names = bool_parameters(function)
    if not names:
        return function
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name in names:
            if name in bound.arguments and bound.arguments[name] is not None:
                bound.arguments[name] = as_bool(bound.arguments[name])
        return function(*bound.args, **bound.kwargs)

    return wrapper


def fire_cli(component, command: list[str] | None = None, name: str | None = None):
    """``fire.Fire`` for a function or a dict of command name -> function, with every switch read by ``as_bool``
    (``command``: the arguments, default ``sys.argv[1:]``). The bundle's fire scripts start through this instead
    of calling ``fire.Fire`` themselves."""
    import fire

    if isinstance(component, dict):
        component = {key: coerce_bools(value) if callable(value) else value for key, value in component.items()}
    elif inspect.isfunction(component):
        component = coerce_bools(component)
    else:
        raise TypeError(f"fire_cli takes a function or a dict of functions, got {type(component).__name__}")
    return fire.Fire(component, command=command, name=name)
