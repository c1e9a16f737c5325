"""``drpo plot-weights``: how each objective weights the policy gradient of one token, as a picture.

::

    drpo plot-weights --mu 0.5 --objectives drpo ppo dppo spo --out weights.png --param drpo.delta=0.2

For a single sampled token whose behaviour probability is ``mu``, every objective's gradient w.r.t.
``z = log pi_theta`` is ``d loss / dz = -A * r * w(pi)`` with ``r = pi / mu``: the plain importance-weighted
policy gradient ``-A r`` times a weight ``w``. The command computes that weight by autograd,

    w(pi) = -(d loss / dz) / (A * r)        for A = +1 and A = -1,

for ``pi`` across (0, 1) (a batch of single-token sequences with mask 1, no aggregation) and draws one panel
per sign of the advantage, with ``pi = mu`` marked. ``w = 1`` is the unclipped policy gradient; PPO's clip and
DPPO's mask show up as ``w = 0`` regions, DRPO's regulariser as a straight line ``1 - sign(A (r - 1))
|pi - mu| / delta`` that crosses 0 at ``|pi - mu| = delta`` and turns corrective beyond it. ``--ratio`` plots
``r * w = -(d loss / dz) / A`` instead (the raw coefficient on grad log pi per unit advantage).

Objectives are looked up by registered name (plugins included), with their default arguments unless
overridden by ``--param NAME.ARG=VALUE`` (VALUE is read as YAML: ``0.2``, ``kl``, ``null``). Objectives that
need the behaviour policy's top-K distribution (DPPO with ``divergence: topk``) are skipped with a note.

Needs matplotlib: ``pip install "drpo-lightning[plot]"``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from drpo_lightning.errors import UserError

__all__ = ["gradient_weights", "main"]

INSTALL_HINT = 'drpo plot-weights needs matplotlib: pip install "drpo-lightning[plot]"'
MAX_POINTS = 100_000
"""Most pi values per curve: far more than a plot can show, and the autograd pass stays under a second."""


def gradient_weights(
    objective: Any, mu: float, pi: torch.Tensor, advantage: float, *, include_ratio: bool = False
) -> torch.Tensor:
    """``w(pi) = -(d loss / dz) / (A r)`` (or ``/ A`` with ``include_ratio``) for one token per ``pi``.

    Args:
        objective: an objective instance.
        mu: the behaviour (anchor) probability of the token, in (0, 1).
        pi: ``[N]`` policy probabilities of the token, in (0, 1).
        advantage: the token's advantage ``A`` (nonzero).
        include_ratio: return ``r * w`` instead of ``w``.

    Returns:
        ``[N]`` float64 weights.
    """
    pi = pi.to(torch.float64)
    z = pi.log().unsqueeze(-1).clone().requires_grad_(True)  # [N, 1]: N sequences of one token
    y = torch.full_like(z, float(torch.tensor(mu, dtype=torch.float64).log()))
    a = torch.full((pi.shape[0],), float(advantage), dtype=torch.float64)
    # global_count=1: the loss is the plain sum of the N token losses, so each token's gradient is its own.
    out = objective(logprobs=z, old_logprobs=y, advantages=a, mask=torch.ones_like(z), global_count=1.0)
    (grad,) = torch.autograd.grad(out.loss, z)
    weight = -grad.squeeze(-1) / advantage
    return weight if include_ratio else weight / (pi / mu)


def _parse_params(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    import yaml

    params: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in items:
        key, eq, value = item.partition("=")
        name, dot, arg = key.partition(".")
        if not (eq and dot and name and arg):
            raise UserError(f"--param must look like NAME.ARG=VALUE (e.g. drpo.delta=0.2), got {item!r}")
        if name not in params:
            raise UserError(f"--param {item!r}: {name!r} is not one of --objectives {list(names)}")
        try:
            params[name][arg] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise UserError(f"--param {item!r}: VALUE is not valid YAML ({_first_line(err)})") from None
    return params


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_param_types(cls: type, name: str, params: dict[str, Any]) -> None:
    """A number argument given text or a list (``--param drpo.delta=abc``) is named here, before the
    constructor compares it with a number and fails with a message that does not say which option it was."""
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not resolve: leave the check to the constructor
        return
    for arg, value in params.items():
        hint = hints.get(arg)
        if hint is None or isinstance(value, (int, float)) or value is None:
            continue
        allowed = set(typing.get_args(hint)) or {hint}
        if allowed & {int, float} and not any(
            isinstance(value, t) for t in allowed if inspect.isclass(t) and t not in (int, float)
        ):
            raise UserError(f"--param {name}.{arg}={value!r}: {arg} must be a number, got {type(value).__name__}")


def _check_out(out: str) -> None:
    """The PNG (or any format matplotlib writes) can be written: its folder exists, its suffix is known."""
    from pathlib import Path

    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(out)
    if not path.parent.is_dir():
        raise UserError(f"--out {out}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {path / 'weights.png'}")
    suffix = path.suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise UserError(f"--out {out}: unknown image format {suffix!r}; use one of {', '.join(sorted(formats))}")


# How token losses are summed, and how DRPO's delta moves between rollouts: no effect on one token's weight at
# the delta drawn.
NOT_DRAWN = ("loss_agg_mode", "loss_agg_horizon", "target_divergence", "delta_min", "delta_max")


def _label(name: str, objective: Any) -> str:
    """``drpo (delta=12.5)``: every argument that shapes the curve, given or default, so each line is named."""
    import inspect

    shown = []
    for arg in inspect.signature(type(objective).__init__).parameters:
        if arg in ("self", *NOT_DRAWN) or not hasattr(objective, arg):
            continue
        if arg.startswith("topk") and not getattr(objective, "requires_topk", 0):
            continue  # Top-K settings of an objective drawn with another divergence
        shown.append(f"{arg}={getattr(objective, arg)}")
    return name + (f" ({', '.join(shown)})" if shown else "")


def main(argv: Sequence[str] | None = None) -> int:
    """``drpo plot-weights``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="drpo plot-weights",
        description="Plot each objective's gradient weight w(pi) on grad log pi, for A > 0 and A < 0. The legend "
        "names every argument of each line. DRPO's default delta = 12.5 (the authors' release) is a weak "
        "regulariser: its weight stays within 1 +- 1/delta = 1 +- 0.08, so its line is nearly flat; "
        "--param drpo.delta=0.2 shows a trust region that bends inside [0, 1].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--mu", type=float, default=0.5, help="behaviour probability of the token (0 < mu < 1)"
    )
    parser.add_argument(
        "--objectives", nargs="+", default=["drpo", "ppo", "dppo"], help="registered objective names"
    )
    parser.add_argument("--out", default="weights.png", help="PNG file to write")
    parser.add_argument(
        "--param",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME.ARG=VALUE",
        help="override an objective's argument, e.g. drpo.delta=0.2 (repeatable)",
    )
    parser.add_argument("--points", type=int, default=399, help="pi values across (0, 1)")
    parser.add_argument("--ratio", action="store_true", help="plot r * w = -(dl/dz)/A instead of w")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    try:
        # The Figure API renders PNGs with the Agg backend without touching pyplot's global backend.
        from matplotlib.figure import Figure
    except ImportError:
        print(f"drpo plot-weights: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    try:
        if not 0 < args.mu < 1:
            raise UserError(f"--mu must be in (0, 1), got {args.mu}")
        if not 3 <= args.points <= MAX_POINTS:
            raise UserError(f"--points must be in [3, {MAX_POINTS}], got {args.points}")
        _check_out(args.out)
        from drpo_lightning.registry import OBJECTIVES

        params = _parse_params(args.param, args.objectives)
        objectives = []
        for name in args.objectives:
            cls = OBJECTIVES.get(name)
            _check_param_types(cls, name, params[name])
            try:
                objective = cls(**params[name])
            except (TypeError, ValueError) as err:
                given = " ".join(f"{name}.{k}={v!r}" for k, v in params[name].items())
                raise UserError(f"objective {name!r}{f' (--param {given})' if given else ''}: "
                                f"{_first_line(err)}") from err
            if getattr(objective, "requires_topk", 0):
                print(
                    f"note: skipping {name} {params[name] or ''}: it needs the behaviour policy's top-K "
                    "distribution, which a single-token plot does not have"
                )
                continue
            objectives.append((_label(name, objective), objective))
        if not objectives:
            raise UserError("nothing to plot: every objective was skipped")
    except UserError as err:
        print(f"drpo plot-weights: error: {err}", file=sys.stderr)
        return 2

    eps = 1.0 / (args.points + 1)
    pi = torch.linspace(eps, 1 - eps, args.points, dtype=torch.float64)
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, advantage in zip(axes, (1.0, -1.0)):
        for label, objective in objectives:
            ax.plot(
                pi.numpy(),
                gradient_weights(objective, args.mu, pi, advantage, include_ratio=args.ratio).numpy(),
                label=label,
            )
        ax.axvline(args.mu, color="grey", linestyle="--", linewidth=1, label=f"pi = mu = {args.mu:g}")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(f"A {'> 0' if advantage > 0 else '< 0'}")
        ax.set_xlabel("pi (policy probability of the sampled token)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("r * w = -(dl/dz) / A" if args.ratio else "w = -(dl/dz) / (A r)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"Gradient weight on grad log pi, mu = {args.mu:g}")
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
