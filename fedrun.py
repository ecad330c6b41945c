"""fedrun: the course's federated-learning experiments from the terminal.

    python -m fedrun run --partition dirichlet --alpha 0.1 --strategy scaffold --rounds 3 --out runs/a
    python -m fedrun run --executor ray-tasks --deadline 30 --crash 0.2 --nan 0.1 --out runs/faulty
    python -m fedrun compare --out build/compare        # strategies x splits x seeds, resumable
    python -m fedrun run --config exp.toml --rounds 5   # a JSON/TOML file of flags; the command line wins
    python -m fedrun run --attack alie --attack-fraction 0.2 --rule trimmed-mean --trim 0.2 --out runs/alie
    python -m fedrun matrix --out build/attacks         # rules x attacks x attacker fractions x splits, resumable

Same code path as the notebooks: `fed_helpers.load_dataset`, `make_partition`, `make_strategy`, and the
round engine `run_rounds` (a `FedTask`, an executor, a round policy and a `Checkpointer`). A run's folder
(--out) holds checkpoint.pt, written after every round, so a stopped run started again with the same
command resumes where it was and ends with the same bits as an unbroken one; at the end it also holds
history.json (config, per-round history, final accuracy, weights sha256, versions), history.csv,
accuracy.png and model.pt (the final state_dict).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import ray
import torch
from tqdm.auto import tqdm

import fed_helpers as fh

# ----------------------------------------------------------------------------
# Flag types: each checks its range, so a bad value fails before any work
# ----------------------------------------------------------------------------


def number(kind: type, low: float, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], Any]:
    """An argparse `type=` parsing an int or float in a range (NaN and +-inf are always refused); its
    `.range` ("a number in (0, 1]") goes into the help text and the error message."""
    what = "an integer" if kind is int else "a number" if high is not None else "a finite number"
    rng = (f"{what} {'>' if low_open else '>='} {low:g}" if high is None else
           f"{what} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}") from None
        ok = math.isfinite(value) and (low < value if low_open else low <= value) and (
            high is None or (value < high if high_open else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}")
        return value

    parse.range = rng
    return parse


def split_spec(text: str) -> str:
    """A compare split: "iid", or a partition and its main parameter, e.g. "dirichlet:0.5"."""
    name, _, value = text.partition(":")
    if name not in fh.PARTITIONERS or (value and name not in MAIN_KNOB):
        raise argparse.ArgumentTypeError(f"{text!r} is not PARTITION or PARTITION:VALUE with PARTITION one of "
                                         f"{', '.join(fh.PARTITIONERS)} (VALUE for {', '.join(MAIN_KNOB)} only)")
    if value:
        try:
            KNOBS[MAIN_KNOB[name]][0](value)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {flag(MAIN_KNOB[name])} {err}") from None
    return text


def strategy_spec(text: str) -> str:
    """A compare strategy: its name, optionally with knobs of its own that override the knob flags
    for it alone, e.g. "fedadam:server_lr=0.03" or "fedprox:mu=0.1" (several: comma-separated)."""
    name, _, rest = text.partition(":")
    if name not in fh.STRATEGIES:
        raise argparse.ArgumentTypeError(f"{text!r}: the strategy must be one of {', '.join(fh.STRATEGIES)}")
    takes = knobs_of("strategy", name)
    for item in rest.split(",") if rest else []:
        key, eq, value = item.partition("=")
        if not eq or key.replace("-", "_") not in takes:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not KNOB=VALUE with KNOB one of "
                                             f"{', '.join(takes) or '(none)'}, the knobs {name} takes")
        try:
            KNOBS[key.replace("-", "_")][0](value)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {key} {err}") from None
    return text


def spec_knobs(spec: str) -> dict[str, Any]:
    """{parameter name: value} of the knobs written into a strategy spec like "fedadam:server_lr=0.03"."""
    name, _, rest = spec.partition(":")
    takes, out = knobs_of("strategy", name), {}
    for item in rest.split(",") if rest else []:
        key, _, value = item.partition("=")
        key = key.replace("-", "_")
        out[takes[key][0]] = KNOBS[key][0](value)
    return out


# ----------------------------------------------------------------------------
# Knobs: which partitions and strategies take which flags (read from fed_helpers)
# ----------------------------------------------------------------------------

KNOBS = {  # flag dest: (type with the range fed_helpers checks, meaning)
    "alpha": (number(float, 0, low_open=True), "Dirichlet concentration: small = strong label skew"),
    "classes_per_client": (number(int, 1), "classes each client holds"),
    "shards_per_client": (number(int, 1), "label-sorted shards each client holds"),
    "beta": (number(float, 0, low_open=True), "Dirichlet concentration of client sizes: small = very unequal"),
    "min_size": (number(int, 1), "fewest samples a client may hold"),
    "mu": (number(float, 0), "weight of the proximal term pulling clients to the global model"),
    "server_lr": (number(float, 0, low_open=True), "server learning rate"),
    "server_momentum": (number(float, 0, 1, high_open=True), "server momentum"),
    "beta1": (number(float, 0, 1, high_open=True), "server first-moment decay"),
    "beta2": (number(float, 0, 1, high_open=True), "server second-moment decay"),
    "tau": (number(float, 0, low_open=True), "server adaptivity: bounds the per-coordinate step"),
}
PARTITION_KNOBS = ("alpha", "classes_per_client", "shards_per_client", "beta", "min_size")
STRATEGY_KNOBS = ("mu", "server_lr", "server_momentum", "beta1", "beta2", "tau")
MAIN_KNOB = {"dirichlet": "alpha", "classes": "classes_per_client", "shards": "shards_per_client", "quantity": "beta"}
BLURB = {"fedavg": "weighted mean of the client models", "fedprox": "+ proximal term --mu on clients",
         "fedavgm": "server momentum", "fedadam": "Adam on the server", "fedyogi": "Yogi on the server",
         "scaffold": "control variates correct client drift"}
STRATEGY_DEST = {"momentum": "server_momentum"}  # FedAvgM's `momentum` is --server-momentum (--momentum is SGD's)
EXECUTORS = {"in-process": fh.InProcess, "ray-tasks": fh.RayTasks, "actor-pool": fh.ActorPool}
FAULT_HELP = {"crash": "raise an error", "kill": "lose their worker process (in-process: crash)",
              "slow": "are stragglers (see --slow-s)", "nan": "send NaN weights"}
POLICY_FLAGS = ("deadline", "min_clients", "max_norm_ratio", *fh.FAULTS, "slow_s")
ATTACK_KNOBS = {  # flag dest: (attack, its parameter, type, meaning) (notebook 11)
    "attack_scale": ("sign-flip", "scale", number(float, 0, low_open=True), "sign-flip: send -scale x the update"),
    "attack_std": ("gaussian", "std", number(float, 0, low_open=True), "gaussian: the noise update's std"),
    "alie_z": ("alie", "z", number(float, 0), "alie: send mean - z std (None: Baruch et al.'s z_max)"),
    "ipm_epsilon": ("ipm", "epsilon", number(float, 0, low_open=True), "ipm: send -epsilon x the honest mean"),
    "backdoor_target": ("backdoor", "target", number(int, 0, 9), "backdoor: the trigger's class (also the class "
                        "whose backdoor success every run measures)"),
    "backdoor_fraction": ("backdoor", "poison_fraction", number(float, 0, 1, low_open=True),
                          "backdoor: share of the attacker's samples triggered"),
    "backdoor_boost": ("backdoor", "boost", number(float, 0, low_open=True),
                       "backdoor: scale of the update (None: clients / attackers in the round)"),
}
RULE_KNOBS = {  # flag dest: (rules that take it, their parameter, type, meaning)
    "trim": (("trimmed-mean",), "trim", number(float, 0, 0.5, high_open=True), "share cut at each end"),
    "krum_f": (("krum", "multi-krum", "bulyan"), "f", number(int, 0), "attackers per round the rule assumes "
               "(None: round(--attack-fraction, or 0.2 without attack, x clients per round); bulyan: at most "
               "(n - 3) / 4)"),
    "krum_m": (("krum", "multi-krum"), "m", number(int, 1), "clients kept (krum 1; multi-krum: n - f)"),
    "clip_tau": (("centered-clipping",), "tau", number(float, 0, low_open=True), "clipping radius"),
    "clip_iters": (("centered-clipping",), "iters", number(int, 1), "clipping iterations"),
    "norm_bound": (("norm-clipping",), "max_norm", number(float, 0, low_open=True), "L2 bound of each update"),
    "norm_noise": (("norm-clipping",), "noise_std", number(float, 0), "std of the noise on the mean"),
}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def knobs_of(kind: str, name: str) -> dict[str, tuple[str, Any]]:
    """{flag dest: (parameter name, default)} of partition or strategy `name`."""
    if kind == "partition":
        params, skip = inspect.signature(fh.PARTITIONERS[name]).parameters, ("labels", "num_clients", "seed")
    else:
        params, skip = inspect.signature(fh.STRATEGIES[name].__init__).parameters, ("self", "num_clients", "state_dir")
    return {STRATEGY_DEST.get(p, p) if kind == "strategy" else p: (p, v.default)
            for p, v in params.items() if p not in skip and v.kind is v.POSITIONAL_OR_KEYWORD}  # not object's *args


def knob_help(kind: str, dest: str) -> str:
    """Help text: meaning, range, and the partitions/strategies that take the knob with their defaults."""
    names = fh.PARTITIONERS if kind == "partition" else fh.STRATEGIES
    takers = [f"{n} {knobs_of(kind, n)[dest][1]:g}" for n in names if dest in knobs_of(kind, n)]
    return f"{KNOBS[dest][1]}; {KNOBS[dest][0].range} (default: {', '.join(takers)})"


def resolve_knobs(args: argparse.Namespace, kind: str, name: str, strict: bool) -> dict[str, Any]:
    """The keyword arguments for partition/strategy `name`: its defaults, overridden by the knob
    flags given. With `strict`, a flag it does not take is an error naming the flag."""
    takes = knobs_of(kind, name)
    for dest in PARTITION_KNOBS if kind == "partition" else STRATEGY_KNOBS:
        if strict and getattr(args, dest) is not None and dest not in takes:
            allowed = ", ".join(flag(d) for d in takes) or "no knobs"
            raise UsageError(f"argument {flag(dest)}: {kind} {name!r} does not take it ({name} takes {allowed})")
    return {p: (getattr(args, d) if getattr(args, d, None) is not None else default)
            for d, (p, default) in takes.items()}


class UsageError(Exception):
    """A bad flag found after parsing; reported as `fedrun: error: ...`, exit status 2."""


FLAG_OF = {"num_clients": "--clients", "client_fraction": "--fraction", "local_epochs": "--epochs",
           "min_clients": "--min-clients", "deadline_s": "--deadline", "num_workers": "--workers",
           "threshold": "--secagg-threshold", "degree": "--secagg-degree", "clip_range": "--secagg-clip-range",
           **{d: flag(d) for d in (*KNOBS, *POLICY_FLAGS, "epochs", "batch_size", "lr", "momentum", "weight_decay",
                                   "rounds", "chunk_size", "seed", "model", "attack_fraction")},
           **{v[1]: flag(d) for d, v in {**ATTACK_KNOBS, **RULE_KNOBS}.items()}}


def usage_error(err: ValueError) -> UsageError:
    """fed_helpers' ValueError ("min_size must be ...") as an error naming the flag."""
    first = str(err).split(" ", 1)[0]
    return UsageError(f"argument {FLAG_OF[first]}: {err}" if first in FLAG_OF else str(err))


# ----------------------------------------------------------------------------
# Command line: the parser, and config files
# ----------------------------------------------------------------------------


def add(p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, kind: Any, default: Any, text: str,
        shown: Any = None, **kw: Any) -> None:
    """One flag whose help ends with its allowed values and "(default: ...)" (`shown`, if given)."""
    rng = f"one of {', '.join(kw['choices'])}" if "choices" in kw else getattr(kind, "range", "")
    p.add_argument(name, type=kind, default=default,
                   help=f"{text}{rng and '; '}{rng} (default: {default if shown is None else shown})", **kw)


def add_run_flags(p: argparse.ArgumentParser, compare: bool) -> None:
    """The flags of `run`; `compare` has the same ones except strategy, partition, seed and restart."""
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of flags (keys with - or _); "
                   "flags on the command line override it (default: none)")
    add(p, "--dataset", str, "fashion_mnist", "dataset", choices=list(fh.DATASETS))
    add(p, "--model", str, "2nn", "model", choices=list(fh.MODELS))
    add(p, "--clients", number(int, 1), 10, "number of clients the training set is split across")
    add(p, "--fraction", number(float, 0, 1, low_open=True), 1.0, "share of clients sampled per round")
    if not compare:
        add(p, "--partition", str, "iid", "how the data is split across clients", choices=list(fh.PARTITIONERS))
        add(p, "--strategy", str, "fedavg", "federated strategy (" + "; ".join(
            f"{n}: {BLURB.get(n, fh.STRATEGIES[n].__name__)}" for n in fh.STRATEGIES) + ")",
            choices=list(fh.STRATEGIES))
    g = p.add_argument_group("partition knobs (only for the partitions that take them)")
    for dest in PARTITION_KNOBS:
        g.add_argument(flag(dest), type=KNOBS[dest][0], help=knob_help("partition", dest))
    g = p.add_argument_group("strategy knobs (only for the strategies that take them)")
    for dest in STRATEGY_KNOBS:
        g.add_argument(flag(dest), type=KNOBS[dest][0], help=knob_help("strategy", dest))
    add(p, "--rounds", number(int, 1), 10, "federated rounds (a rerun with more continues from the checkpoint)")
    add(p, "--epochs", number(int, 1), 1, "local epochs per round")
    add(p, "--batch-size", number(int, 1), 32, "local batch size")
    add(p, "--lr", number(float, 0, low_open=True), 0.05, "client SGD learning rate")
    add(p, "--momentum", number(float, 0, 1, high_open=True), 0.0, "client SGD momentum")
    add(p, "--weight-decay", number(float, 0), 0.0, "client SGD weight decay")
    if not compare:
        add(p, "--seed", number(int, 0), 0, "seed of the split, the model, client sampling and faults")
    add(p, "--train-samples", number(int, 1), None, "use a seeded random subset of this many training samples "
        "(None: all)")
    g = p.add_argument_group("round policy", "With none of these flags, a client that fails stops the run. With "
                             "any of them (notebook 08's Resilient policy), failed, late and rejected clients are "
                             "left out of their round, with the reason in the history.")
    add(g, "--deadline", number(float, 0, low_open=True), None, "seconds a round waits for its clients; the late "
        "ones are left out (None: no deadline)")
    add(g, "--min-clients", number(int, 1), None, "fewest usable updates a round needs to change the model, at most "
        "the clients sampled per round; with fewer the model is kept (None: 1)")
    add(g, "--max-norm-ratio", number(float, 1), None, "reject an update whose norm ||w_k - w|| is over this many "
        "times the round's median (None: no norm rule; NaN and wrong-shape updates are always rejected)")
    for fault in fh.FAULTS:
        add(g, flag(fault), number(float, 0, 1), 0.0, f"fault injection: share of client-rounds that "
            f"{FAULT_HELP[fault]}; --crash + --kill + --slow + --nan must be at most 1")
    add(g, "--slow-s", number(float, 0), None, "seconds a straggler (--slow) naps before it answers (None: it "
        "never answers, which needs a --deadline)")
    g = p.add_argument_group("differential privacy (notebook 09)", "User-level DP-FedAvg: each update is "
                             "clipped to --dp-clip, the server adds Gaussian noise of std --dp-noise x clip to the "
                             "sum, and the history records epsilon at --dp-delta after every round.")
    add(g, "--dp-clip", number(float, 0, low_open=True), None, "clip every update to this L2 norm (None: no DP)")
    add(g, "--dp-noise", number(float, 0), None, "noise multiplier z, needs --dp-clip (None: 0, clipping only)")
    add(g, "--dp-delta", number(float, 0, 1, low_open=True, high_open=True), None, "the delta of (epsilon, "
        "delta), below 1 / --clients (None: 1e-5, or 0.1 / --clients if smaller), needs --dp-clip")
    add(g, "--dp-weight-cap", number(int, 1), None, "a client counts min(samples, cap) in the mean (None: the "
        "largest client's samples, FedAvg's weights), needs --dp-clip")
    g = p.add_argument_group("secure aggregation (notebook 10)", "Bonawitz et al.'s double masking: each client "
                             "quantizes and masks its update, the server unmasks only the sum (with --dp-clip, the "
                             "clients add the noise). The protocol's bytes are counted in the history.")
    add(g, "--secagg", str, None, "every-pair: masks between every two clients (Bonawitz et al.); secagg+: along a "
        "random k-regular graph (Bell et al.) (None: no secure aggregation)", choices=["every-pair", "secagg+"])
    add(g, "--secagg-degree", number(int, 2), None, "neighbours per client in secagg+, even (None: log2 of the "
        "clients per round, rounded up to even)")
    add(g, "--secagg-threshold", number(float, 0, 1, low_open=True), None, "t = ceil(this x holders of a "
        "client's shares) must answer, or the round keeps the model (None: 2/3)")
    add(g, "--secagg-clip-range", number(float, 0, low_open=True), None, "each coordinate of an update is "
        "clipped to [-r, r] before quantizing, without --dp-clip (None: 1.0)")
    g = p.add_argument_group("where clients train", "Every executor gives the same weights, bit for bit.")
    add(g, "--executor", str, None, "in-process: one client after another in this process, without Ray; "
        "ray-tasks: one Ray task per client; actor-pool: long-lived Ray actors that keep the data",
        shown="actor-pool", choices=list(EXECUTORS))
    g.add_argument("--no-ray", action="store_true", help="same as --executor in-process (default: False)")
    add(g, "--cpus", number(int, 1), None, "CPUs for Ray (None: all); not for in-process")
    add(g, "--workers", number(int, 1), None, "actor-pool only: ClientTrainer actors, at most --cpus "
        "(None: one per Ray CPU)")
    add(g, "--chunk-size", number(int, 1), None, "actor-pool only: clients per chunk of work handed to an actor "
        "(None: about 8 chunks per worker and round)")
    add(p, "--data-dir", str, None, "where the datasets are (None: $FED_DATA_DIR, else the course's data/)")
    if compare:
        add(p, "--out", str, "build/compare", "output folder: one run folder (with its checkpoint) per strategy, "
            "split and seed, and the table")
    else:
        add(p, "--out", str, "build/fedrun", "the run folder: checkpoint.pt after every round (the same command "
            "run again resumes from it), then history.json/.csv, accuracy.png, model.pt")
        p.add_argument("--restart", action="store_true", help="delete the checkpoint in --out and start the run "
                       "afresh (default: False: resume from it)")


def add_attack_flags(p: argparse.ArgumentParser, matrix: bool) -> None:
    """Notebook 11's flags: the attack and the aggregation rule (`matrix`: lists of them) and their knobs."""
    g = p.add_argument_group("attacks and robust aggregation (notebook 11)", "A fixed set of --attack-fraction "
                             "of the clients attacks whenever sampled; the server aggregates with --rule.")
    if not matrix:
        add(g, "--attack", str, None, "what the attackers do (None: no attack)", choices=list(fh.ATTACKS))
        add(g, "--attack-fraction", number(float, 0, 1, high_open=True), None, "share of the clients that are "
            "attackers, a fixed set for the run (None: 0.2 with --attack)")
        add(g, "--rule", str, "fedavg", "server-side aggregation rule", choices=list(fh.RULES))
    default = lambda cls, param: cls.__dataclass_fields__[param].default  # the piece's own default
    for dest, (who, param, kind, text) in ATTACK_KNOBS.items():
        add(g, flag(dest), kind, None, text, shown=default(fh.ATTACKS[who], param))
    for dest, (who, param, kind, text) in RULE_KNOBS.items():
        shown = "see above" if dest == "krum_f" else default(fh.RULES[who[0]], param)
        add(g, flag(dest), kind, None, f"{', '.join(who)}: {text}", shown=shown)


def override_defaults(p: argparse.ArgumentParser, **values: Any) -> None:
    """Other defaults for some flags of `p`, in their help text too."""
    p.set_defaults(**values)
    for action in p._actions:
        if action.dest in values and action.help:
            action.help = action.help.rsplit("(default: ", 1)[0] + f"(default: {values[action.dest]})"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `fedrun` parser, and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(prog="fedrun", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,compare,matrix}")
    run = sub.add_parser("run", help="run one experiment (resumable)", description="Run one federated experiment; "
                         "its folder --out holds a checkpoint, so the same command run again resumes it.")
    add_run_flags(run, compare=False)
    add_attack_flags(run, matrix=False)
    cmp = sub.add_parser("compare", help="strategies x splits x seeds, one Ray session, resumable",
                         description="Run every strategy on every split with every seed; print and write a "
                         "table of final accuracy (mean ± std over seeds). Finished runs with the same "
                         "config are skipped and stopped ones resume from their checkpoint, so a stopped "
                         "comparison can be rerun.")
    add_run_flags(cmp, compare=True)
    cmp.add_argument("--strategies", nargs="+", type=strategy_spec, metavar="NAME",
                     default=["fedavg", "fedprox", "scaffold", "fedadam"],
                     help=f"strategies, each one of {', '.join(fh.STRATEGIES)}, optionally with knobs for it "
                     "alone: NAME:KNOB=VALUE[,KNOB=VALUE], e.g. fedadam:server_lr=0.03 "
                     "(default: fedavg fedprox scaffold fedadam)")
    cmp.add_argument("--splits", nargs="+", type=split_spec, metavar="SPLIT",
                     default=["iid", "dirichlet:0.5", "dirichlet:0.1", "classes:2"],
                     help="splits, each a partition and optionally its main parameter (dirichlet:ALPHA, "
                     "classes:CLASSES_PER_CLIENT, shards:SHARDS_PER_CLIENT, quantity:BETA) "
                     "(default: iid dirichlet:0.5 dirichlet:0.1 classes:2)")
    cmp.add_argument("--seeds", nargs="+", type=number(int, 0), metavar="SEED", default=[0, 1, 2],
                     help="seeds, each an integer >= 0 (default: 0 1 2)")
    mat = sub.add_parser("matrix", help="rules x attacks x attacker fractions x splits (notebook 11), resumable",
                         description="Run every aggregation rule against every attack at every attacker "
                         "fraction on every split (FedAvg's strategy), plus each rule with no attack; print and "
                         "write tables of final accuracy and backdoor success. Resumable like compare.")
    add_run_flags(mat, compare=True)
    override_defaults(mat, clients=100, fraction=0.2, rounds=30, out="build/attacks")
    add_attack_flags(mat, matrix=True)
    mat.add_argument("--rules", nargs="+", choices=list(fh.RULES), metavar="RULE", default=list(fh.RULES),
                     help=f"rules, each one of {', '.join(fh.RULES)} (default: all)")
    mat.add_argument("--attacks", nargs="+", choices=list(fh.ATTACKS), metavar="ATTACK", default=list(fh.ATTACKS),
                     help=f"attacks, each one of {', '.join(fh.ATTACKS)} (default: all); every rule also runs "
                     "without attack")
    mat.add_argument("--attack-fractions", nargs="+", type=number(float, 0, 1, low_open=True, high_open=True),
                     metavar="F", default=[0.2], help="attacker fractions, each a number in (0, 1) (default: 0.2)")
    mat.add_argument("--splits", nargs="+", type=split_spec, metavar="SPLIT", default=["iid", "dirichlet:0.5"],
                     help="splits, as for compare (default: iid dirichlet:0.5)")
    mat.add_argument("--seeds", nargs="+", type=number(int, 0), metavar="SEED", default=[0],
                     help="seeds, each an integer >= 0 (default: 0)")
    return parser, {"run": run, "compare": cmp, "matrix": mat}


def apply_config(sub: argparse.ArgumentParser, path: str) -> None:
    """Make the values in config file `path` the defaults of `sub`, checked like flags."""
    try:
        text = Path(path).read_text()
        data = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    except (OSError, ValueError) as err:
        sub.error(f"argument --config: cannot read {path}: {err}")
    actions = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            sub.error(f"argument --config: unknown key {key!r} in {path}; keys are {sorted(actions)}")

        def convert(v: Any, action: argparse.Action = action, key: str = key) -> Any:
            if isinstance(action, argparse._StoreTrueAction) != isinstance(v, bool) or isinstance(v, (dict, list)):
                sub.error(f"argument --config: {key} in {path} must be "
                          f"{'true or false' if action.nargs == 0 else 'a number or a string'}, got {v!r}")
            try:
                v = v if isinstance(v, bool) else action.type(str(v)) if action.type else str(v)
            except argparse.ArgumentTypeError as err:
                sub.error(f"argument {action.option_strings[0]} (in {path}): {err}")
            if action.choices is not None and v not in action.choices:
                sub.error(f"argument {action.option_strings[0]} (in {path}): must be one of "
                          f"{', '.join(action.choices)}, got {v!r}")
            return v

        many = action.nargs == "+"
        if many and not isinstance(value, list):
            value = [value]
        values[action.dest] = [convert(v) for v in value] if many else convert(value)
    sub.set_defaults(**values)


# ----------------------------------------------------------------------------
# One experiment: config -> task, strategy, policy -> run_rounds -> files
# ----------------------------------------------------------------------------


def policy_config(args: argparse.Namespace) -> dict[str, Any]:
    """The round policy the flags ask for, as plain values: "strict" unless a policy flag is given."""
    faults = {f: getattr(args, f) for f in fh.FAULTS}
    if sum(faults.values()) > 1 + 1e-9:
        given = " + ".join(f"{flag(f)} {v:g}" for f, v in faults.items() if v)
        raise UsageError(f"argument {', '.join(flag(f) for f in fh.FAULTS)}: the fault rates must add up to at "
                         f"most 1, got {given} = {sum(faults.values()):g}")
    if args.slow_s is not None and not faults["slow"]:
        raise UsageError("argument --slow-s: only stragglers nap; it needs --slow > 0")
    if faults["slow"] and args.slow_s is None and args.deadline is None:
        raise UsageError("argument --slow: stragglers that never answer (no --slow-s) need a --deadline")
    resilient = any(getattr(args, d) not in (None, 0.0) for d in POLICY_FLAGS)
    return {"name": "resilient" if resilient else "strict", "deadline_s": args.deadline,
            "min_clients": args.min_clients or 1, "max_norm_ratio": args.max_norm_ratio, "faults": faults,
            "slow_s": args.slow_s}


def make_policy(p: dict[str, Any], attack: dict[str, Any] | None = None, clients: int = 1,
                secure: bool = False) -> fh.RoundPolicy:
    """The engine's round policy for `policy_config`'s values (with an attack: notebook 11's `Adversary`;
    `secure`: for masked answers, notebook 10's `SecureResilient`)."""
    if attack is not None:
        return fh.Adversary(deadline_s=p["deadline_s"], min_clients=p["min_clients"],
                            max_norm_ratio=p["max_norm_ratio"], faults={f: r for f, r in p["faults"].items() if r > 0},
                            slow_s=math.inf if p["slow_s"] is None else p["slow_s"],
                            attack=fh.make_attack(attack["name"], **attack["knobs"]),
                            attack_fraction=attack["fraction"], num_clients=clients)
    if p["name"] == "strict":
        return fh.RoundPolicy(min_clients=p["min_clients"])
    kind = fh.SecureResilient if secure else fh.Resilient
    return kind(deadline_s=p["deadline_s"], min_clients=p["min_clients"], max_norm_ratio=p["max_norm_ratio"],
                faults={f: r for f, r in p["faults"].items() if r > 0},
                slow_s=math.inf if p["slow_s"] is None else p["slow_s"])


def experiment_config(args: argparse.Namespace, partition: str, strategy: str, seed: int,
                      split: str | None = None, strict: bool = True) -> dict[str, Any]:
    """Everything that determines a run's result (not where or how fast it runs)."""
    pknobs = resolve_knobs(args, "partition", partition, strict)
    if split and ":" in split:
        pknobs[MAIN_KNOB[partition]] = KNOBS[MAIN_KNOB[partition]][0](split.partition(":")[2])
    name = strategy.partition(":")[0]  # in compare, a spec like "fedadam:server_lr=0.03"
    sknobs = {**resolve_knobs(args, "strategy", name, strict), **spec_knobs(strategy)}
    return {"dataset": args.dataset, "model": args.model, "partition": partition, "partition_knobs": pknobs,
            "clients": args.clients, "fraction": args.fraction, "strategy": name,
            "strategy_knobs": sknobs, "rounds": args.rounds,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
            "weight_decay": args.weight_decay, "seed": seed, "train_samples": args.train_samples,
            "policy": policy_config(args), "privacy": privacy_config(args), "secagg": secagg_config(args, name),
            **attack_config(args, getattr(args, "attack", None), getattr(args, "attack_fraction", None),
                            getattr(args, "rule", "fedavg"), strict)}


def attack_config(args: argparse.Namespace, attack: str | None, fraction: float | None, rule: str,
                  strict: bool) -> dict[str, Any]:
    """Notebook 11's part of a config: {"attack": ..., "rule": ...}, each only when asked for (so that the
    configs of earlier runs are unchanged). With `strict`, a knob flag for another attack or rule is an error."""
    if fraction is not None and attack is None:
        raise UsageError("argument --attack-fraction: needs --attack (the attackers' share of the clients)")
    for dest, (who, *_) in ATTACK_KNOBS.items():
        if strict and getattr(args, dest, None) is not None and who != attack and dest != "backdoor_target":
            raise UsageError(f"argument {flag(dest)}: only the {who} attack takes it (--attack is {attack})")
    for dest, (who, *_) in RULE_KNOBS.items():
        if strict and getattr(args, dest, None) is not None and rule not in who:
            raise UsageError(f"argument {flag(dest)}: only {' and '.join(who)} take it (--rule is {rule})")
    out: dict[str, Any] = {}
    if attack is not None:
        fraction = 0.2 if fraction is None else fraction
        out["attack"] = {"name": attack, "fraction": fraction, "knobs": {
            param: getattr(args, d) for d, (who, param, *_) in ATTACK_KNOBS.items()
            if who == attack and getattr(args, d, None) is not None}}
    if rule != "fedavg":
        knobs = {param: getattr(args, d) for d, (who, param, *_) in RULE_KNOBS.items()
                 if rule in who and getattr(args, d, None) is not None}
        if rule in ("krum", "multi-krum", "bulyan") and "f" not in knobs:
            m = max(1, round(args.fraction * args.clients))
            knobs["f"] = round((fraction or 0.2) * m)
            knobs["f"] = min(knobs["f"], (m - 3) // 4) if rule == "bulyan" else knobs["f"]
        out["rule"] = {"name": rule, "knobs": knobs}
    if getattr(args, "backdoor_target", None) is not None:
        out["backdoor_target"] = args.backdoor_target
    return out


def privacy_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The DP pieces the flags ask for, as plain values (None: no DP)."""
    given = [flag(d) for d in ("dp_noise", "dp_delta", "dp_weight_cap") if getattr(args, d) is not None]
    if args.dp_clip is None:
        if given:
            raise UsageError(f"argument {given[0]}: needs --dp-clip (the noise and the weights are in its units)")
        return None
    delta = min(1e-5, 0.1 / args.clients) if args.dp_delta is None else args.dp_delta
    if delta >= 1 / args.clients:
        raise UsageError(f"argument --dp-delta: must be a number in (0, {1 / args.clients:g}) (below 1 / --clients "
                         f"{args.clients}: a larger delta lets a mechanism publish one client's data), got {delta:g}")
    return {"clip": args.dp_clip, "noise": args.dp_noise or 0.0, "delta": delta, "weight_cap": args.dp_weight_cap}


def secagg_config(args: argparse.Namespace, strategy: str) -> dict[str, Any] | None:
    """The secure-aggregation knobs the flags ask for, as plain values (None: none), checked by name."""
    knobs = ("secagg_degree", "secagg_threshold", "secagg_clip_range")
    given = [flag(d) for d in knobs if getattr(args, d) is not None]
    if args.secagg is None:
        if given:
            raise UsageError(f"argument {given[0]}: needs --secagg")
        return None
    if args.secagg_degree is not None and (args.secagg != "secagg+" or args.secagg_degree % 2):
        raise UsageError(f"argument --secagg-degree: needs --secagg secagg+ and an even integer >= 2, got "
                         f"--secagg {args.secagg} --secagg-degree {args.secagg_degree}")
    if args.secagg_clip_range is not None and args.dp_clip is not None:
        raise UsageError("argument --secagg-clip-range: not with --dp-clip (DP sets the range from the clip and noise)")
    if args.max_norm_ratio is not None:
        raise UsageError("argument --max-norm-ratio: not allowed with --secagg (the server cannot see update norms)")
    if strategy == "scaffold":
        raise UsageError("argument --strategy: scaffold needs each client's update on the server; not with --secagg")
    per_round = max(1, round(args.fraction * args.clients))
    degree = None if args.secagg == "every-pair" else args.secagg_degree or fh.log_degree(per_round)
    return {"degree": degree, "threshold": args.secagg_threshold or 2 / 3,
            "clip_range": args.secagg_clip_range or 1.0}


def privacy_pieces(cfg: dict, task: fh.FedTask) -> dict[str, Any]:
    """run_rounds' transform, aggregate and callbacks for the config's DP and secure aggregation (FedAvg's
    when there is neither)."""
    dp, sa = cfg.get("privacy"), cfg.get("secagg")
    if sa is not None:
        knobs = {"threshold": sa["threshold"], "degree": sa["degree"]}
        transform, rule = (fh.secure_aggregation(task, sa["clip_range"], **knobs) if dp is None else
                           fh.secure_dp_mean(task, dp["clip"], dp["noise"], dp["weight_cap"], **knobs))
        ledger = [] if dp is None else [fh.PrivacyLedger.for_task(task, dp["noise"], dp["delta"])]
        return {"transform": transform, "aggregate": rule, "callbacks": [fh.ProtocolBytes(rule), *ledger]}
    if dp is None:
        return {"transform": None, "aggregate": fh.weighted_mean, "callbacks": []}
    return {"transform": fh.ClipUpdate(dp["clip"]), "aggregate": fh.dp_mean(task, dp["clip"], dp["noise"],
                                                                            dp["weight_cap"]),
            "callbacks": [fh.PrivacyLedger.for_task(task, dp["noise"], dp["delta"])]}


def runtime_config(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Where and how the clients train (not part of the result: every executor gives the same bits)."""
    if args.no_ray and args.executor not in (None, "in-process"):
        raise UsageError(f"argument --no-ray: not allowed with --executor {args.executor}")
    executor = "in-process" if args.no_ray else args.executor or "actor-pool"
    for dest, who in (("cpus", ("ray-tasks", "actor-pool")), ("workers", ("actor-pool",)),
                      ("chunk_size", ("actor-pool",))):
        if getattr(args, dest) is not None and executor not in who:
            raise UsageError(f"argument {flag(dest)}: the {executor} executor does not take it (only "
                             f"{' and '.join(who)})")
    if args.workers is not None and args.cpus is not None and args.workers > args.cpus:
        raise UsageError(f"argument --workers: must be an integer in [1, {args.cpus}] (one CPU each, --cpus "
                         f"{args.cpus}), got {args.workers}")
    return {"executor": executor, "cpus": args.cpus, "workers": args.workers, "chunk_size": args.chunk_size,
            "command": ["fedrun", *argv], "data_dir": args.data_dir}


def make_executor(runtime: dict[str, Any]):
    """A new executor as `runtime` asks."""
    if runtime["executor"] == "actor-pool":
        return fh.ActorPool(num_workers=runtime["workers"], chunk_size=runtime["chunk_size"])
    return EXECUTORS[runtime["executor"]]()


def load_data(dataset: str, data_dir: str | None) -> tuple[tuple, tuple]:
    """(train, test) of `dataset`, found wherever fedrun is run from."""
    root = data_dir or os.environ.get("FED_DATA_DIR") or Path(fh.__file__).resolve().parent / "data"
    return fh.load_dataset(dataset, train=True, root=root), fh.load_dataset(dataset, train=False, root=root)


def subset(cfg: dict, data: tuple[tuple, tuple]) -> tuple[tuple, tuple]:
    """`data` with the training set cut to the config's seeded subset, if it asks for one."""
    train, test = data
    if cfg["train_samples"] is not None:
        if cfg["train_samples"] > len(train[1]):
            raise UsageError(f"argument --train-samples: must be an integer in [1, {len(train[1])}] (the "
                             f"training set's size), got {cfg['train_samples']}")
        keep = torch.from_numpy(np.sort(np.random.default_rng(cfg["seed"]).choice(
            len(train[1]), cfg["train_samples"], replace=False)))
        train = (train[0][keep], train[1][keep])
    return train, test


def prepare(cfg: dict, data: tuple[tuple, tuple]) -> tuple[fh.FedTask, fh.FedAvg, fh.RoundPolicy, dict]:
    """The engine's task, strategy and round policy, or UsageError naming the flag: all before any training."""
    try:
        parts = fh.make_partition(cfg["partition"], data[0][1].numpy(), cfg["clients"], seed=cfg["seed"],
                                  **cfg["partition_knobs"])
        strategy = fh.make_strategy(cfg["strategy"], cfg["clients"], **cfg["strategy_knobs"])
        config = fh.TrainConfig(cfg["model"], cfg["epochs"], cfg["batch_size"], cfg["lr"], cfg["momentum"],
                                cfg["weight_decay"])
        task = fh.FedTask(*data, parts, config, cfg["fraction"], cfg["seed"])
        policy = make_policy(cfg["policy"], cfg.get("attack"), cfg["clients"], secure=cfg.get("secagg") is not None)
        pieces = privacy_pieces(cfg, task)
        sampled = max(1, round(cfg["fraction"] * cfg["clients"]))
        if cfg.get("secagg") and (cfg.get("rule") or cfg.get("attack")):
            flag_, why = (("--rule", "a robust rule must see each update, and --secagg masks them")
                          if cfg.get("rule") else ("--attack", "the attacks are simulated on plain updates"))
            raise UsageError(f"argument {flag_}: not with --secagg ({why}; notebook 11)")
        if cfg.get("rule"):
            if cfg.get("privacy"):
                raise UsageError(f"argument --rule: {cfg['rule']['name']} cannot be combined with --dp-clip "
                                 "(both are the server's aggregation)")
            knobs = {**cfg["rule"]["knobs"], **({"seed": cfg["seed"]} if cfg["rule"]["name"] == "norm-clipping"
                                                else {})}
            pieces["aggregate"] = fh.make_rule(cfg["rule"]["name"], sampled, **knobs)
    except ValueError as err:
        raise usage_error(err) from None
    if policy.min_clients > sampled:
        raise UsageError(f"argument --min-clients: must be an integer in [1, {sampled}] (the clients sampled per "
                         f"round: --fraction {cfg['fraction']:g} of --clients {cfg['clients']}), got "
                         f"{policy.min_clients}")
    return task, strategy, policy, pieces


def checkpointed_rounds(out: Path, cfg: dict, prepared: tuple) -> int:
    """How many rounds the checkpoint in `out` holds (0: none), once all of it is checked against this
    run's settings (ValueError if it belongs to another run): nothing is changed."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return 0
    task, strategy, policy, pieces = prepared
    fingerprint = fh.run_fingerprint(task, strategy, policy, pieces["transform"], pieces["aggregate"])
    num_params = fh.flat_weights(fh.make_model(cfg["model"])).numel()
    return fh.load_checkpoint(path, fingerprint, strategy, num_params, cfg["rounds"])["round"]


def forget_checkpoint(out: Path) -> None:
    """Delete the checkpoint (and SCAFFOLD's per-client state) in `out`: the run starts afresh."""
    for name in ("checkpoint.pt", "checkpoint.pt.tmp"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "client_state", ignore_errors=True)


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every state-dict tensor's float32 bytes, in order."""
    h = hashlib.sha256()
    for tensor in model.state_dict().values():
        h.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def round_line(h: dict, rounds: int) -> str:
    """One line per round: test accuracy and loss, training loss, drift, clients used, what was left out."""
    shown = lambda v: "-" if v is None else f"{v:.4f}"
    out = [f"round {h['round']:>3}/{rounds}", f"accuracy {h['accuracy']:.4f}", f"loss {h['loss']:.4f}",
           f"train_loss {shown(h['train_loss'])}", f"drift {shown(h['drift'])}",
           f"clients {h['clients']}/{len(h['sampled'])}"]
    out += [f"{k} {len(h[k])}" for k in ("failed", "late", "rejected") if h[k]]
    out += [] if h["aggregated"] else ["model kept"]
    out += [f"epsilon {h['epsilon']:.3g}"] if "epsilon" in h else []
    return "  ".join([*out, f"{h['seconds']:.1f} s"])


def write_csv(path: Path, history: list[dict]) -> None:
    """history.csv: one row per round; lists and dicts (which clients) as JSON, None as empty."""
    cell = lambda v: json.dumps(v) if isinstance(v, (list, dict)) else "" if v is None else v
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(history[0]))
        writer.writerows([[cell(v) for v in h.values()] for h in history])


def run_one(cfg: dict, prepared: tuple, out: Path, runtime: dict, progress: bool = True,
            verbose: bool = True) -> dict:
    """Train (or resume) one experiment with `run_rounds`, checkpointed in `out`, and write its files there."""
    task, strategy, policy, pieces = prepared
    done = checkpointed_rounds(out, cfg, prepared)
    if verbose and done:
        tqdm.write(f"resuming from {out}/checkpoint.pt: {done} of {cfg['rounds']} rounds done")

    def on_round(history: list[dict]) -> None:  # one line per round, printed above the progress bar
        if verbose:
            tqdm.write(round_line(history[-1], cfg["rounds"]))

    start = time.perf_counter()
    executor = make_executor(runtime) if done < cfg["rounds"] else fh.InProcess()  # finished: nothing to train
    model, history = fh.run_rounds(task, cfg["rounds"], strategy, executor, policy, pieces["transform"],
                                   pieces["aggregate"], fh.Checkpointer(out), [*pieces["callbacks"], on_round],
                                   progress=progress)
    best = max(history, key=lambda h: h["accuracy"])
    record = {"config": cfg, "history": history, "final_accuracy": history[-1]["accuracy"],
              "final_loss": history[-1]["loss"], "best_accuracy": best["accuracy"], "best_round": best["round"],
              "weights_sha256": weights_sha256(model), "resumed_after": done,
              "backdoor_success": fh.backdoor_success(model, *task.test, cfg.get("backdoor_target", 0))
              if {"attack", "rule", "backdoor_target"} & set(cfg) else None,
              "seconds": time.perf_counter() - start, "runtime": runtime,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "numpy": np.__version__, "ray": ray.__version__}}
    torch.save(model.state_dict(), out / "model.pt")
    write_csv(out / "history.csv", history)
    label = ", ".join([cfg["strategy"], cfg["partition"], *(f"{k}={v}" for k, v in cfg["partition_knobs"].items())])
    fig = fh.plot_history({label: history})
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    tmp = out / "history.json.tmp"  # written last, renamed: its presence means the run finished
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out / "history.json")
    return record


# ----------------------------------------------------------------------------
# compare: strategies x splits x seeds
# ----------------------------------------------------------------------------


def plan_compare(args: argparse.Namespace) -> list[tuple[tuple, dict, tuple]]:
    """Every run of the grid as ((split, strategy, seed), config, prepared), each checked before any training."""
    names_of = {"partition": [s.partition(":")[0] for s in args.splits],
                "strategy": [s.partition(":")[0] for s in args.strategies]}
    for kind, names in names_of.items():
        for dest in PARTITION_KNOBS if kind == "partition" else STRATEGY_KNOBS:
            if getattr(args, dest) is not None and not any(dest in knobs_of(kind, n) for n in names):
                raise UsageError(f"argument {flag(dest)}: no {kind} of the comparison takes it")
    full, data, plan = load_data(args.dataset, args.data_dir), {}, []
    for key in [(sp, st, sd) for sp in args.splits for st in args.strategies for sd in args.seeds]:
        cfg = experiment_config(args, key[0].partition(":")[0], key[1], key[2], key[0], strict=False)
        if cfg["seed"] not in data:  # one training subset per seed, shared by its runs
            data[cfg["seed"]] = subset(cfg, full)
        plan.append((key, cfg, prepare(cfg, data[cfg["seed"]])))
    return plan


def compare(args: argparse.Namespace, plan: list[tuple[tuple, dict, tuple]], runtime: dict) -> None:
    """Run every run of the plan (skip it if done with the same config; resume it from its checkpoint if
    stopped; start it afresh if its checkpoint is from other settings), then write the table."""
    out, records = Path(args.out), {}
    for (split, strategy, seed), cfg, prepared in tqdm(plan, desc="runs", unit="run"):
        folder = out / split.replace(":", "-") / strategy.replace(":", "-").replace(",", "_") / f"seed{seed}"
        name = f"{split} {strategy} seed{seed}"
        rec, skipped = run_or_resume(folder, cfg, prepared, runtime, name)
        records[split, strategy, seed] = rec
        if not skipped:
            tqdm.write(f"done {name}: final accuracy {rec['final_accuracy']:.4f}, best {rec['best_accuracy']:.4f}, "
                       f"{rec['seconds']:.1f} s" + (f" (resumed after round {rec['resumed_after']})"
                                                    if rec["resumed_after"] else ""))
    write_table(args, records, out)


def run_or_resume(folder: Path, cfg: dict, prepared: tuple, runtime: dict, name: str) -> tuple[dict, bool]:
    """One run of a grid: (its record, True) if `folder` holds it done with the same config; else it runs,
    resumed from its checkpoint if stopped, started afresh if the checkpoint is from other settings."""
    old = json.loads((folder / "history.json").read_text()) if (folder / "history.json").exists() else None
    if old is not None and old["config"] == json.loads(json.dumps(cfg)):
        tqdm.write(f"skip {name}: {folder}/history.json exists with the same config")
        return old, True
    try:
        checkpointed_rounds(folder, cfg, prepared)
    except ValueError as err:
        tqdm.write(f"restart {name}: {err}")
        forget_checkpoint(folder)
    return run_one(cfg, prepared, folder, runtime, progress=False, verbose=False), False


def write_table(args: argparse.Namespace, records: dict[tuple, dict], out: Path) -> None:
    """table.md + results.json (final accuracy mean ± std over seeds) and compare.png."""
    table: dict[str, dict[str, dict]] = {}
    for strategy in args.strategies:
        for split in args.splits:
            recs = [records[split, strategy, s] for s in args.seeds]
            final = np.array([r["final_accuracy"] for r in recs])
            table.setdefault(strategy, {})[split] = {
                "mean": float(final.mean()), "std": float(final.std(ddof=1)) if len(final) > 1 else 0.0,
                "best_mean": float(np.mean([r["best_accuracy"] for r in recs])), "seeds": len(recs)}
    lines = [f"Final test accuracy (%), mean ± std over seeds {' '.join(map(str, args.seeds))} "
             f"(best round's mean in brackets)", "",
             "| strategy | " + " | ".join(args.splits) + " |", "|---" * (len(args.splits) + 1) + "|"]
    for strategy, row in table.items():
        lines.append(f"| {strategy} | " + " | ".join(
            f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f} ({100 * c['best_mean']:.2f})" for c in row.values()) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    runs = [{"split": sp, "strategy": st, "seed": sd, "final_accuracy": r["final_accuracy"],
             "best_accuracy": r["best_accuracy"], "weights_sha256": r["weights_sha256"]}
            for (sp, st, sd), r in records.items()]
    (out / "results.json").write_text(json.dumps({"table": table, "runs": runs}, indent=1))
    fig, axes = plt.subplots(1, len(args.splits), figsize=(4 * len(args.splits), 3.5), squeeze=False)
    for ax, split in zip(axes[0], args.splits):
        for strategy in args.strategies:
            acc = np.mean([[h["accuracy"] for h in records[split, strategy, s]["history"]] for s in args.seeds], 0)
            ax.plot(np.arange(1, len(acc) + 1), 100 * acc, marker="o", label=strategy)
        ax.set(xlabel="round", ylabel="test accuracy (%)", title=f"{split} (mean over {len(args.seeds)} seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------
# matrix: rules x attacks x attacker fractions x splits (notebook 11)
# ----------------------------------------------------------------------------

NO_ATTACK = "none"


def plan_matrix(args: argparse.Namespace) -> list[tuple[tuple, dict, tuple]]:
    """Every run as ((split, rule, attack, fraction, seed), config, prepared), all checked before any training;
    each rule also runs once without attack (attack "none", fraction 0)."""
    cells = [(NO_ATTACK, 0.0)] + [(a, f) for a in args.attacks for f in args.attack_fractions]
    full, data, plan = load_data(args.dataset, args.data_dir), {}, []
    for sp, rule, (attack, frac), sd in [(sp, r, c, sd) for sp in args.splits for r in args.rules for c in cells
                                         for sd in args.seeds]:
        cfg = experiment_config(args, sp.partition(":")[0], "fedavg", sd, sp, strict=False)
        cfg.update(attack_config(args, None if attack == NO_ATTACK else attack, None if attack == NO_ATTACK
                                 else frac, rule, strict=False))
        cfg.setdefault("backdoor_target", 0)  # every run measures the backdoor's success
        if cfg["seed"] not in data:
            data[cfg["seed"]] = subset(cfg, full)
        plan.append(((sp, rule, attack, frac, sd), cfg, prepare(cfg, data[cfg["seed"]])))
    return plan


def matrix(args: argparse.Namespace, plan: list[tuple[tuple, dict, tuple]], runtime: dict) -> None:
    """Run (or skip, or resume) every run of the plan as `compare` does, then write the tables."""
    out, records = Path(args.out), {}
    for key, cfg, prepared in tqdm(plan, desc="runs", unit="run"):
        split, rule, attack, frac, seed = key
        folder = out / split.replace(":", "-") / rule / f"{attack}-{frac:g}" / f"seed{seed}"
        name = f"{split} {rule} {attack} {frac:g} seed{seed}"
        records[key], skipped = run_or_resume(folder, cfg, prepared, runtime, name)
        rec = records[key]
        if not skipped:
            tqdm.write(f"done {name}: accuracy {rec['final_accuracy']:.4f}, backdoor {rec['backdoor_success']:.4f}, "
                       f"{rec['seconds']:.1f} s")
    write_matrix(args, records, out)


def write_matrix(args: argparse.Namespace, records: dict[tuple, dict], out: Path) -> None:
    """table.md (final accuracy %, mean over seeds, per split: rules x attacks at each fraction; the backdoor's
    success), results.json and one curves figure per split."""
    cols = [(NO_ATTACK, 0.0)] + [(a, f) for a in args.attacks for f in args.attack_fractions]
    mean = lambda sp, r, a, f, k: float(np.mean([records[sp, r, a, f, s][k] for s in args.seeds]))
    lines = [f"Final test accuracy (%) after {args.rounds} rounds, {args.clients} clients, {args.fraction:g} per "
             f"round, mean over seeds {' '.join(map(str, args.seeds))}; columns: attack @ attacker fraction", ""]
    for sp in args.splits:
        lines += [f"### {sp}", "", "| rule | " + " | ".join(f"{a} @ {f:g}" for a, f in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(f"{100 * mean(sp, r, a, f, 'final_accuracy'):.2f}" for a, f in cols) + " |"
                  for r in args.rules]
        if "backdoor" in args.attacks:
            lines += ["", f"Backdoor ({sp}): main accuracy % / backdoor success % (no attack: the trigger's "
                      "success on the clean model)", "", "| rule | no attack | " + " | ".join(
                          f"backdoor @ {f:g}" for f in args.attack_fractions) + " |",
                      "|---" * (len(args.attack_fractions) + 2) + "|"]
            lines += [f"| {r} | " + " | ".join(f"{100 * mean(sp, r, a, f, 'final_accuracy'):.2f} / "
                                               f"{100 * mean(sp, r, a, f, 'backdoor_success'):.2f}"
                                               for a, f in cols if a in (NO_ATTACK, "backdoor")) + " |"
                      for r in args.rules]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    runs = [{"split": k[0], "rule": k[1], "attack": k[2], "attack_fraction": k[3], "seed": k[4],
             "final_accuracy": r["final_accuracy"], "backdoor_success": r["backdoor_success"],
             "accuracy": [h["accuracy"] for h in r["history"]], "seconds": r["seconds"]} for k, r in records.items()]
    (out / "results.json").write_text(json.dumps({"runs": runs}, indent=1))
    for sp in args.splits:  # one panel per attack column, one line per rule
        fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), sharey=True, squeeze=False)
        for ax, (a, f) in zip(axes[0], cols):
            for r in args.rules:
                acc = np.mean([[h["accuracy"] for h in records[sp, r, a, f, s]["history"]] for s in args.seeds], 0)
                ax.plot(np.arange(1, len(acc) + 1), 100 * acc, label=r)
            ax.set(xlabel="round", title=f"{sp}: {a} @ {f:g}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test accuracy (%)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"curves-{sp.replace(':', '-')}.png", dpi=80)
        plt.close(fig)


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def start_ray(cpus: int | None) -> bool:
    """`fh.init_ray(cpus)`; True if this call started Ray. Without RAY_ADDRESS, ray.init() would join the
    latest cluster started on this machine (/tmp/ray/ray_current_cluster), maybe someone else's: `init_ray`
    starts a local one instead."""
    if ray.is_initialized():
        return False
    fh.init_ray(cpus)
    return True


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (and --config), check everything, run, return the exit status."""
    matplotlib.use("Agg")
    parser, subs = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.config:
        apply_config(subs[args.command], args.config)
        args = parser.parse_args(argv)
    started_ray = False
    try:  # check everything (flags, data, split, strategy, policy, checkpoint), then start Ray once, then train
        runtime = runtime_config(args, argv)
        if args.command == "run":
            out = Path(args.out)
            cfg = experiment_config(args, args.partition, args.strategy, args.seed)
            prepared = prepare(cfg, subset(cfg, load_data(args.dataset, args.data_dir)))
            try:
                done = 0 if args.restart else checkpointed_rounds(out, cfg, prepared)
            except ValueError as err:
                raise UsageError(f"argument --out: {str(err).replace('run_dir', '--out')}; or --restart "
                                 "to start this run afresh") from None
        else:
            plan = plan_compare(args) if args.command == "compare" else plan_matrix(args)
        needs_ray = runtime["executor"] != "in-process" and (args.command != "run" or done < cfg["rounds"])
        started_ray = needs_ray and start_ray(args.cpus)
        if args.command != "run":
            (compare if args.command == "compare" else matrix)(args, plan, runtime)
            return 0
        if args.restart:
            forget_checkpoint(out)
        out.mkdir(parents=True, exist_ok=True)
        rec = run_one(cfg, prepared, out, runtime)
        print(f"final accuracy {rec['final_accuracy']:.4f} (best {rec['best_accuracy']:.4f} in round "
              f"{rec['best_round']}), weights sha256 {rec['weights_sha256'][:12]}, {rec['seconds']:.1f} s; "
              f"wrote {args.out}/history.json, history.csv, accuracy.png, model.pt")
        return 0
    except UsageError as err:
        parser.error(str(err))
    except FileNotFoundError as err:  # a dataset that is not on this machine and cannot be downloaded
        parser.exit(1, f"fedrun: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, "fedrun: stopped; run the same command again to resume from the last checkpoint\n")
    finally:
        if started_ray:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
