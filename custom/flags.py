"""Boolean settings from configs and the command line.

``python -m monai.bundle run ... --pictures false`` passes the string 'false', which Python treats as true;
every component that takes an on/off setting from a config reads it through ``as_bool``.
"""

from __future__ import annotations

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
