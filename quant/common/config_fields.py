"""Reading quantization_config fields: formats spell the same field differently (bits / w_bit,
group_size / q_group_size), and a wrong type is an error naming the field."""

from __future__ import annotations

from typing import Any, Sequence

from quant.base import QuantConfigError


def config_field(config: dict[str, Any], keys: Sequence[str], default: Any = None) -> Any:
    """The first of `keys` present (and not None) in `config`; formats spell fields differently."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def config_int(config: dict[str, Any], keys: Sequence[str], default: int | None, method: str) -> int | None:
    value = config_field(config, keys, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise QuantConfigError(f"{method} quantization_config field {keys[0]}={value!r} must be an integer")
    return value


def config_bool(config: dict[str, Any], keys: Sequence[str], method: str) -> bool | None:
    value = config_field(config, keys)
    if value is not None and not isinstance(value, bool):
        raise QuantConfigError(f"{method} quantization_config field {keys[0]}={value!r} must be true or false")
    return value
