"""Resolve rewards by registry name, ``package.module:function`` or ``path/to/file.py:function``.

Registry entries are *factories* (keyword arguments -> reward callable), named as ``"module:attribute"`` strings
so that ``import diffrl`` imports no reward's dependencies: a model-backed reward imports its heavy packages and
loads its weights only when it is built. A ``module:function`` or ``file.py:function`` target is the reward itself.
A reward file is executed only when a user names it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from diffrl.rewards.combine import Reward, WeightedSum

REGISTRY: dict[str, str] = {
    "shapes": "diffrl.rewards.shapes:make_shapes",
    "shapes_strict": "diffrl.rewards.shapes:make_shapes_strict",
    "shapes_learned": "diffrl.rewards.shapes_learned:make_shapes_learned",
    "jpeg_compressibility": "diffrl.rewards.jpeg:jpeg_compressibility",
    "jpeg_incompressibility": "diffrl.rewards.jpeg:jpeg_incompressibility",
    "aesthetic": "diffrl.rewards.clip:aesthetic",
    "pickscore": "diffrl.rewards.clip:pickscore",
    "clipscore": "diffrl.rewards.clip:clipscore",
    "hpsv2": "diffrl.rewards.hps:hpsv2",
    "imagereward": "diffrl.rewards.imagereward:imagereward",
    "remote": "diffrl.rewards.remote:RemoteReward",
}


def _import_attribute(target: str) -> object:
    """``"package.module:attr"`` or ``"path/to/file.py:attr"`` -> the object."""
    location, _, attribute = target.rpartition(":")
    if not location or not attribute:
        raise ValueError(f"{target!r} is not of the form 'package.module:function' or 'path/to/file.py:function'.")
    if location.endswith(".py"):
        path = Path(location).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward file {str(path)!r} does not exist (from {target!r}).")
        module_name = f"diffrl_user_reward_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            raise ValueError(f"cannot import module {location!r} for reward {target!r}: {error}") from error
    if not hasattr(module, attribute):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"{location!r} has no {attribute!r} (for reward {target!r}); it defines: {', '.join(public)}."
        )
    return getattr(module, attribute)


def build_reward(spec: str | Reward, **kwargs: object) -> Reward:
    """One reward from a registry name (built with ``kwargs``), a ``module:function`` / ``file.py:function``
    target, a reward server's ``http://host:port`` (``kwargs`` go to :class:`~diffrl.rewards.remote.RemoteReward`),
    or a callable (returned as is)."""
    if callable(spec):
        if kwargs:
            raise ValueError("keyword arguments are for registry rewards; a callable is used as it is.")
        return spec
    if spec.startswith(("http://", "https://")):
        from diffrl.rewards.remote import RemoteReward

        return RemoteReward(spec, **kwargs)
    if spec in REGISTRY:
        factory = _import_attribute(REGISTRY[spec])
        accepted = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [key for key in kwargs if key not in accepted and not takes_any]
        missing = [
            name for name, p in accepted.items()
            if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name not in kwargs
        ]  # fmt: skip
        if unknown or missing:
            problem = f"takes no {unknown}" if unknown else f"needs {missing}"
            raise ValueError(
                f"reward {spec!r} {problem}; its arguments are {list(accepted)}. Give them in reward.kwargs as "
                f'{{"{spec}": {{"name": value}}}}.'
            )
        return factory(**kwargs)
    if ":" in spec:
        if kwargs:
            raise ValueError(f"keyword arguments are for registry rewards; {spec!r} is used as it is.")
        reward = _import_attribute(spec)
        if not callable(reward):
            raise TypeError(f"{spec!r} is a {type(reward).__name__}, not a callable reward.")
        return reward
    close = difflib.get_close_matches(spec, REGISTRY, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    raise ValueError(
        f"unknown reward {spec!r}{hint} Use a registry name ({', '.join(sorted(REGISTRY))}), "
        "'package.module:function', 'path/to/file.py:function', or a reward server's http://host:port."
    )


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def short_name(spec: str) -> str:
    """The stable name a reward part is logged under (``reward/<name>/mean``): a registry name as it is, a
    ``module:function`` or ``file.py:function`` target's function, ``remote`` for a reward server's URL."""
    if spec in REGISTRY:
        return spec
    if spec.startswith(("http://", "https://")):
        return "remote"
    return spec.rpartition(":")[2] or spec


def name_and_spec(item: str) -> tuple[str, str]:
    """``"NAME=SPEC"`` -> ``(NAME, SPEC)``; a bare spec is named by :func:`short_name`."""
    name, sep, spec = item.partition("=")
    if not sep:
        return short_name(item), item
    if not NAME.fullmatch(name) or not spec:
        raise ValueError(
            f"reward {item!r}: write NAME=SPEC with a name of letters, digits, '_', '.' or '-' (e.g. "
            "brightness=rewards/mine.py:brightness), or SPEC=WEIGHT with a number."
        )
    return name, spec


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def reward_parts(text: str) -> list[tuple[str, str, float]]:
    """The ``(name, spec, weight)`` of every part of a reward spec:
    ``"pickscore=1.0,bright=rewards/mine.py:brightness=0.5"`` -> ``[("pickscore", "pickscore", 1.0), ("bright",
    "rewards/mine.py:brightness", 0.5)]``. A part is ``[NAME=]SPEC[=WEIGHT]``: without a name it is named by
    :func:`short_name`, without a weight it weighs 1."""
    parts, names = [], set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ValueError(f"empty reward name in {text!r}; separate rewards with single commas.")
        head, sep, weight_text = item.rpartition("=")
        weight = _number(weight_text) if sep else None
        if weight is None:  # no "=", or NAME=SPEC without a weight
            weight = 1.0
        else:
            item = head
            if not math.isfinite(weight):
                raise ValueError(f"reward weight in {item!r} must be finite.")
        name, spec = name_and_spec(item)
        if name in names:
            raise ValueError(
                f"two rewards in {text!r} are both named {name!r}; name them apart: NAME=SPEC (e.g. a={spec})."
            )
        names.add(name)
        parts.append((name, spec, weight))
    return parts


def parse_reward_spec(text: str) -> dict[str, float]:
    """``"pickscore=1.0,jpeg_compressibility=0.1"`` -> ``{"pickscore": 1.0, "jpeg_compressibility": 0.1}``: each
    part's spec and weight (see :func:`reward_parts` for the names)."""
    return {spec: weight for _, spec, weight in reward_parts(text)}


def code_rewards(spec: str) -> list[str]:
    """The parts of a reward spec that name code to import and run (``module:function`` or ``file.py:function``),
    as opposed to registry names and reward servers."""
    try:
        names = parse_reward_spec(spec)
    except ValueError:
        return [spec]
    return [n for n in names if n not in REGISTRY and not n.startswith(("http://", "https://")) and ":" in n]


def weighted_sum(
    rewards: str | Reward | Mapping[str | Callable, float],
    kwargs: Mapping[str, Mapping[str, object]] | None = None,
    on_invalid: str = "raise",
) -> WeightedSum:
    """Build the combined reward the trainers use.

    Args:
        rewards: a spec string (``"shapes"``, ``"pickscore=1.0,jpeg_compressibility=0.1"``), a callable, or a dict
            of names / callables to weights.
        kwargs: per-part keyword arguments for registry rewards, keyed by the part's name (or spec), e.g.
            ``{"pickscore": {"model_dir": "/models/ps"}}``.
        on_invalid: ``"raise"`` or ``"drop"`` (see :class:`WeightedSum`).
    """
    kwargs = dict(kwargs or {})
    if isinstance(rewards, str):
        named = reward_parts(rewards)
    else:
        items = {rewards: 1.0} if callable(rewards) else rewards
        named = [
            (*name_and_spec(spec), weight) if isinstance(spec, str)
            else (getattr(spec, "__name__", type(spec).__name__), spec, weight)
            for spec, weight in items.items()
        ]  # fmt: skip
    parts: dict[str, tuple[Reward, float]] = {}
    for name, spec, weight in named:
        if name in parts:
            raise ValueError(f"two rewards are both named {name!r}; name them apart: NAME=SPEC.")
        own = kwargs.pop(name, None)
        if own is None and isinstance(spec, str):
            own = kwargs.pop(spec, {})  # kwargs may name a part by its spec too
        reward = build_reward(spec, **(own or {})) if isinstance(spec, str) else spec
        parts[name] = (reward, float(weight))
    if kwargs:
        raise ValueError(f"reward kwargs given for {sorted(kwargs)}, which are not among the rewards {list(parts)}.")
    return WeightedSum(parts, on_invalid=on_invalid)
