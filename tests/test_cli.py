"""The `fedrun` command: tiny experiments end to end on the round engine, its executors and round
policies, the run folder's checkpoint (a run killed with SIGKILL resumes bit for bit), config
files, bad flags, and `compare`.

Two runs go through a real subprocess (`python -m fedrun`); the rest call `fedrun.main` in this
process, which parses the same argv and exits with the same status. Only the executor test uses Ray
(the session's `ray_cluster`).
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import same_weights

import fed_helpers as fh
import fedrun

ROOT = Path(__file__).resolve().parents[1]
# synthetic data, 800 training samples, a linear model: a run takes well under a second
TINY = ["--dataset", "synthetic", "--model", "simple", "--clients", "4", "--rounds", "2", "--train-samples", "800",
        "--batch-size", "16", "--lr", "0.1", "--seed", "3"]
NO_RAY = ["--executor", "in-process"]


def load_record(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def load_model(out: Path) -> torch.nn.Module:
    model = fh.make_model("simple")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    return model


def checkpoint_round(out: Path) -> int:
    return torch.load(out / "checkpoint.pt", weights_only=True)["round"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One FedProx run through the real command line, without Ray."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = subprocess.run([sys.executable, "-m", "fedrun", "run", *TINY, "--strategy", "fedprox", *NO_RAY,
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc, out


def test_run_writes_consistent_outputs(cli_run, synthetic_test):
    proc, out = cli_run
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith("round")] == [
        ["round", "1/2"], ["round", "2/2"]]
    rec = load_record(out)
    assert rec["config"]["strategy"] == "fedprox" and rec["config"]["strategy_knobs"] == {"mu": 0.01}
    assert rec["config"]["clients"] == 4 and rec["config"]["train_samples"] == 800 and rec["config"]["seed"] == 3
    assert rec["config"]["policy"]["name"] == "strict" and rec["runtime"]["executor"] == "in-process"
    assert rec["resumed_after"] == 0 and set(rec["versions"]) >= {"python", "torch", "numpy", "ray"}
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [h["round"] for h in rec["history"]] == [1, 2]
    assert [float(r["accuracy"]) for r in rows] == [h["accuracy"] for h in rec["history"]]
    assert [json.loads(r["sampled"]) for r in rows] == [h["sampled"] for h in rec["history"]] == [[0, 1, 2, 3]] * 2
    for h in rec["history"]:  # the engine's one history format
        assert h["bytes_sent"] == h["bytes_down"] + h["bytes_up"] and h["aggregated"] and h["clients"] == 4
    assert rec["final_accuracy"] == rec["history"][-1]["accuracy"]
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    model = load_model(out)
    assert fedrun.weights_sha256(model) == rec["weights_sha256"]
    assert fh.evaluate(model, *synthetic_test)[1] == rec["final_accuracy"]
    assert checkpoint_round(out) == 2  # the run folder holds the last round's checkpoint
    assert torch.equal(torch.load(out / "checkpoint.pt", weights_only=True)["weights"], fh.flat_weights(model))


def test_same_seed_same_weights_on_every_executor(cli_run, tmp_path, ray_cluster):
    _, out = cli_run
    ref = load_record(out)
    for executor, extra in [("in-process", []), ("ray-tasks", ["--cpus", "2"]),
                            ("actor-pool", ["--workers", "2", "--chunk-size", "1"])]:
        folder = tmp_path / executor
        assert fedrun.main(["run", *TINY, "--strategy", "fedprox", "--executor", executor, *extra,
                            "--out", str(folder)]) == 0
        rec = load_record(folder)
        assert rec["runtime"]["executor"] == executor and rec["config"] == ref["config"]
        assert rec["weights_sha256"] == ref["weights_sha256"], executor
        assert without_timing(rec["history"]) == without_timing(ref["history"]), executor


KILLED = [*TINY[:6], "--rounds", "12", "--train-samples", "2000", "--epochs", "2", *TINY[10:],
          "--strategy", "scaffold", "--fraction", "0.5", *NO_RAY]


def test_a_run_killed_with_sigkill_resumes_bit_identical(tmp_path):
    """`fedrun run ... --out D`, SIGKILLed once the checkpoint holds a round and before the end, then
    the same command again: it resumes, and ends with the bits and history of an unbroken run."""
    folder, command = tmp_path / "killed", [sys.executable, "-m", "fedrun", "run", *KILLED]
    proc = subprocess.Popen([*command, "--out", str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (folder / "checkpoint.pt").exists() and checkpoint_round(folder) >= 1:
                break
            time.sleep(0.01)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=60)
    assert alive, f"the run ended before it was killed:\n{out[-2000:]}\n{err[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    stopped = checkpoint_round(folder)
    assert 1 <= stopped < 12 and not (folder / "history.json").exists()

    again = subprocess.run([*command, "--out", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {folder}/checkpoint.pt: {stopped} of 12 rounds done" in again.stdout
    assert fedrun.main(["run", *KILLED, "--out", str(tmp_path / "unbroken")]) == 0  # the same run, never stopped
    resumed, unbroken = load_record(folder), load_record(tmp_path / "unbroken")
    assert resumed["resumed_after"] == stopped and unbroken["resumed_after"] == 0
    assert same_weights(load_model(folder), load_model(tmp_path / "unbroken"))
    assert resumed["weights_sha256"] == unbroken["weights_sha256"]
    assert without_timing(resumed["history"]) == without_timing(unbroken["history"])


def test_rerun_continues_with_more_rounds_and_finished_runs_do_not_train(cli_run, tmp_path, monkeypatch):
    _, out = cli_run
    folder = tmp_path / "more"
    argv = ["run", *TINY, "--strategy", "fedprox", *NO_RAY, "--out", str(folder)]
    assert fedrun.main(argv) == 0
    assert load_record(folder)["weights_sha256"] == load_record(out)["weights_sha256"]
    assert fedrun.main([*argv, "--rounds", "3"]) == 0  # continues from round 2
    assert fedrun.main(["run", *TINY, "--strategy", "fedprox", *NO_RAY, "--rounds", "3",
                        "--out", str(tmp_path / "three")]) == 0
    more, three = load_record(folder), load_record(tmp_path / "three")
    assert more["resumed_after"] == 2 and more["weights_sha256"] == three["weights_sha256"]
    assert without_timing(more["history"]) == without_timing(three["history"])
    monkeypatch.setattr(fh, "train_client", lambda *a, **k: pytest.fail("a finished run trained again"))
    monkeypatch.setattr(fh, "init_ray", lambda *a, **k: pytest.fail("Ray started for a finished run"))
    assert fedrun.main([*argv, "--rounds", "3", "--executor", "actor-pool"]) == 0  # the executor: not a setting
    assert load_record(folder)["weights_sha256"] == three["weights_sha256"]


def test_a_checkpoint_of_other_settings_is_refused_unless_restart(cli_run, tmp_path, capsys):
    folder = tmp_path / "r"
    argv = ["run", *TINY, "--strategy", "fedprox", *NO_RAY, "--out", str(folder)]
    assert fedrun.main(argv) == 0
    before = (folder / "checkpoint.pt").read_bytes()
    for extra, expected in [(["--lr", "0.2"], "config differ"), (["--rounds", "1"], "already holds 2 rounds"),
                            (["--crash", "0.1"], "policy differ")]:
        with pytest.raises(SystemExit) as exc:
            fedrun.main([*argv, *extra])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2 and "argument --out:" in last and expected in last and "--restart" in last, last
        assert (folder / "checkpoint.pt").read_bytes() == before  # nothing changed
    assert fedrun.main([*argv, "--lr", "0.2", "--restart"]) == 0
    rec = load_record(folder)
    assert rec["config"]["lr"] == 0.2 and rec["resumed_after"] == 0
    assert rec["weights_sha256"] != load_record(cli_run[1])["weights_sha256"]


def test_resilient_flags_reach_the_engine(tmp_path):
    """Faults, a deadline, min_clients and the norm rule: every sampled client is accepted, failed, late
    or rejected, with the reason in the history; the model stays finite."""
    folder = tmp_path / "faulty"
    assert fedrun.main(["run", *TINY[:4], "--clients", "8", *TINY[6:], "--rounds", "3", *NO_RAY, "--crash", "0.3",
                        "--nan", "0.2", "--slow", "0.2", "--slow-s", "0", "--deadline", "120", "--min-clients", "2",
                        "--max-norm-ratio", "5", "--out", str(folder)]) == 0
    rec = load_record(folder)
    assert rec["config"]["policy"] == {"name": "resilient", "deadline_s": 120.0, "min_clients": 2,
                                       "max_norm_ratio": 5.0, "slow_s": 0.0,
                                       "faults": {"crash": 0.3, "kill": 0.0, "slow": 0.2, "nan": 0.2}}
    for h in rec["history"]:
        filed = set(h["accepted"]) | set(map(int, h["failed"])) | set(h["late"]) | set(map(int, h["rejected"]))
        assert sorted(filed) == sorted(h["sampled"]) == list(range(8))  # sampled: in hand-out order
        assert all("injected fault" in e for e in h["failed"].values())
        assert all("NaN" in r or "norm" in r for r in h["rejected"].values())
        assert h["aggregated"] == (len(h["accepted"]) >= 2)
    assert sum(len(h["failed"]) for h in rec["history"]) > 0 and sum(len(h["rejected"]) for h in rec["history"]) > 0
    assert torch.isfinite(fh.flat_weights(load_model(folder))).all()


def test_privacy_flags_reach_the_engine_and_the_history_has_epsilon(tmp_path, capsys):
    """DP-FedAvg from the terminal: the same run as the engine's pieces give, epsilon per round from the
    accountant, a resumed run that ends with the same bits and epsilons, and other noise refused on resume."""

    def argv(rounds: int, noise: float, out: str) -> list[str]:
        return ["run", *TINY, *NO_RAY, "--rounds", str(rounds), "--clients", "8", "--fraction", "0.5",
                "--dp-clip", "0.5", "--dp-noise", str(noise), "--dp-delta", "1e-3", "--out", str(tmp_path / out)]

    assert fedrun.main(argv(3, 0.8, "whole")) == 0
    rec = load_record(tmp_path / "whole")
    assert rec["config"]["privacy"] == {"clip": 0.5, "noise": 0.8, "delta": 1e-3, "weight_cap": None}
    assert [h["epsilon"] for h in rec["history"]] == [fh.dp_epsilon(0.8, 0.5, t, 1e-3) for t in (1, 2, 3)]
    cfg = rec["config"]
    task = fedrun.prepare(cfg, fedrun.subset(cfg, fedrun.load_data("synthetic", None)))[0]
    model, _ = fh.run_rounds(task, 3, transform=fh.ClipUpdate(0.5), aggregate=fh.dp_mean(task, 0.5, 0.8),
                             progress=False)
    assert same_weights(model, load_model(tmp_path / "whole"))
    assert fedrun.main(argv(1, 0.8, "cut")) == 0
    before = (tmp_path / "cut" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as exc:  # the checkpoint was made with other noise
        fedrun.main(argv(3, 1.6, "cut"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "argument --out:" in last and "--restart" in last, last
    assert (tmp_path / "cut" / "checkpoint.pt").read_bytes() == before
    assert fedrun.main(argv(3, 0.8, "cut")) == 0  # resumes after round 1
    cut = load_record(tmp_path / "cut")
    assert cut["resumed_after"] == 1 and cut["weights_sha256"] == rec["weights_sha256"]
    assert [h["epsilon"] for h in cut["history"]] == [h["epsilon"] for h in rec["history"]]


def test_secagg_flags_reach_the_engine_and_count_the_protocol_bytes(tmp_path):
    """Secure aggregation from the terminal: the engine's pieces give the same model (the keys are fresh
    each run, the masks cancel), the protocol's bytes are in the history, a crash is recovered from, and
    with --dp-clip the clients add the noise and the history has the same epsilon as central DP."""
    base = ["run", *TINY, *NO_RAY, "--rounds", "2", "--clients", "8", "--fraction", "0.5"]
    assert fedrun.main([*base, "--secagg", "secagg+", "--crash", "0.2", "--out", str(tmp_path / "sa")]) == 0
    rec = load_record(tmp_path / "sa")
    assert rec["config"]["secagg"] == {"degree": 2, "threshold": 2 / 3, "clip_range": 1.0}
    assert rec["config"]["policy"]["name"] == "resilient"
    assert all(h["secagg"]["protocol_up"] > 0 and h["drift"] is None for h in rec["history"])
    cfg = rec["config"]
    task, _, policy, _ = fedrun.prepare(cfg, fedrun.subset(cfg, fedrun.load_data("synthetic", None)))
    assert isinstance(policy, fh.SecureResilient)
    transform, rule = fh.secure_aggregation(task, degree=2)
    model, hist = fh.run_rounds(task, 2, transform=transform, aggregate=rule, policy=policy, progress=False)
    assert same_weights(model, load_model(tmp_path / "sa"))
    assert [h["aggregated"] for h in hist] == [h["aggregated"] for h in rec["history"]]
    assert fedrun.main([*base, "--secagg", "every-pair", "--dp-clip", "0.5", "--dp-noise", "1", "--dp-delta", "1e-3",
                        "--out", str(tmp_path / "sdp")]) == 0
    dp = load_record(tmp_path / "sdp")
    assert [h["epsilon"] for h in dp["history"]] == [fh.dp_epsilon(1.0, 0.5, t, 1e-3) for t in (1, 2)]
    assert dp["config"]["secagg"]["degree"] is None


def test_config_file_equals_the_same_flags(cli_run, tmp_path):
    _, out = cli_run
    keys = [a.lstrip("-") for a in TINY[0::2]]
    lines = [f'{k.replace("-", "_") if i % 2 else k} = {json.dumps(v) if k in ("dataset", "model") else v}'
             for i, (k, v) in enumerate(zip(keys, TINY[1::2]))]  # dashes and underscores mixed
    config = tmp_path / "exp.toml"
    config.write_text("\n".join([*lines, 'strategy = "fedprox"', "no-ray = true"]) + "\n")
    assert fedrun.main(["run", "--config", str(config), "--out", str(tmp_path / "c")]) == 0
    rec, ref = load_record(tmp_path / "c"), load_record(out)
    assert rec["config"] == ref["config"] and rec["weights_sha256"] == ref["weights_sha256"]
    assert rec["runtime"]["executor"] == "in-process"


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({"dataset": "synthetic", "model": "simple", "train_samples": 400, "rounds": 3,
                                  "strategy": "fedprox", "mu": 0.5, "executor": "in-process", "clients": 2,
                                  "deadline": 60}))
    assert fedrun.main(["run", "--config", str(config), "--rounds", "1", "--clients", "3",
                        "--out", str(tmp_path / "o")]) == 0
    rec = load_record(tmp_path / "o")
    assert rec["config"]["rounds"] == 1 and len(rec["history"]) == 1 and rec["config"]["clients"] == 3
    assert rec["config"]["strategy_knobs"] == {"mu": 0.5} and rec["config"]["train_samples"] == 400
    assert rec["config"]["policy"]["name"] == "resilient" and rec["config"]["policy"]["deadline_s"] == 60


BAD = [  # extra flags, what stderr must say (the flag, its allowed range)
    (["--fraction", "0"], ["--fraction", "(0, 1]"]),
    (["--fraction", "1.5"], ["--fraction", "(0, 1]"]),
    (["--fraction", "nan"], ["--fraction", "(0, 1]", "'nan'"]),
    (["--clients", "0"], ["--clients", ">= 1"]),
    (["--partition", "dirichlet", "--alpha", "-1"], ["--alpha", "> 0"]),
    (["--partition", "dirichlet", "--alpha", "inf"], ["--alpha", "finite number > 0", "'inf'"]),
    (["--strategy", "nope"], ["--strategy", "fedavg", "scaffold"]),
    (["--strategy", "fedprox", "--mu", "-1"], ["--mu", ">= 0"]),
    (["--strategy", "fedprox", "--mu", "inf"], ["--mu", "finite number >= 0", "'inf'"]),
    (["--mu", "0.1"], ["--mu", "'fedavg' does not take it", "no knobs"]),
    (["--strategy", "fedadam", "--server-lr", "0"], ["--server-lr", "> 0"]),
    (["--strategy", "scaffold", "--server-lr", "0"], ["--server-lr", "> 0"]),
    (["--strategy", "fedavgm", "--server-lr", "nan"], ["--server-lr", "> 0", "'nan'"]),
    (["--partition", "dirichlet", "--beta", "0.5"], ["--beta", "takes --alpha, --min-size"]),
    (["--rounds", "0"], ["--rounds", ">= 1"]),
    (["--momentum", "1"], ["--momentum", "[0, 1)"]),
    (["--momentum", "nan"], ["--momentum", "[0, 1)", "'nan'"]),
    (["--lr", "nan"], ["--lr", "> 0", "'nan'"]),
    (["--lr", "inf"], ["--lr", "finite number > 0", "'inf'"]),
    (["--lr=-inf"], ["--lr", "> 0", "'-inf'"]),
    (["--weight-decay", "inf"], ["--weight-decay", ">= 0", "'inf'"]),
    (["--clients", "801"], ["--clients", "[1, 800]"]),  # checked by fed_helpers, after loading the data
    (["--partition", "classes", "--classes-per-client", "11"], ["--classes-per-client", "[1, 10]"]),
    (["--train-samples", "6001"], ["--train-samples", "[1, 6000]"]),
    (["--deadline", "0"], ["--deadline", "> 0"]),
    (["--deadline", "inf"], ["--deadline", "finite number > 0", "'inf'"]),
    (["--min-clients", "0"], ["--min-clients", ">= 1"]),
    (["--min-clients", "5"], ["--min-clients", "[1, 4]", "sampled per round"]),
    (["--fraction", "0.5", "--min-clients", "3"], ["--min-clients", "[1, 2]"]),
    (["--max-norm-ratio", "0.5"], ["--max-norm-ratio", ">= 1"]),
    (["--max-norm-ratio", "nan"], ["--max-norm-ratio", ">= 1", "'nan'"]),
    (["--crash", "1.5"], ["--crash", "[0, 1]"]),
    (["--nan", "nan"], ["--nan", "[0, 1]", "'nan'"]),
    (["--crash", "0.5", "--nan", "0.6"], ["--crash", "--nan", "add up to at most 1", "1.1"]),
    (["--kill", "0.4", "--slow", "0.4", "--crash", "0.3", "--deadline", "9"], ["--kill", "--slow", "at most 1"]),
    (["--slow", "0.2"], ["--slow", "--deadline"]),  # stragglers that never answer and no deadline
    (["--slow-s", "1"], ["--slow-s", "--slow > 0"]),
    (["--slow", "0.2", "--slow-s", "-1"], ["--slow-s", ">= 0"]),
    (["--slow", "0.2", "--slow-s", "inf"], ["--slow-s", "finite number >= 0", "'inf'"]),
    (["--executor", "gpu"], ["--executor", "in-process", "actor-pool"]),
    (["--workers", "2"], ["--workers", "in-process executor does not take it", "actor-pool"]),
    (["--chunk-size", "0"], ["--chunk-size", ">= 1"]),
    (["--cpus", "2"], ["--cpus", "in-process executor does not take it"]),
    (["--dp-clip", "0"], ["--dp-clip", "> 0"]),
    (["--dp-clip", "nan"], ["--dp-clip", "> 0", "'nan'"]),
    (["--dp-noise", "1"], ["--dp-noise", "needs --dp-clip"]),
    (["--dp-clip", "1", "--dp-noise", "-1"], ["--dp-noise", ">= 0"]),
    (["--dp-clip", "1", "--dp-delta", "1"], ["--dp-delta", "(0, 1)"]),
    (["--dp-clip", "1", "--dp-delta", "0.3"], ["--dp-delta", "(0, 0.25)", "1 / --clients"]),
    (["--dp-clip", "1", "--dp-weight-cap", "0"], ["--dp-weight-cap", ">= 1"]),
    (["--dp-weight-cap", "5"], ["--dp-weight-cap", "needs --dp-clip"]),
    (["--secagg", "plus"], ["--secagg", "every-pair", "secagg+"]),
    (["--secagg-degree", "4"], ["--secagg-degree", "needs --secagg"]),
    (["--secagg", "every-pair", "--secagg-degree", "4"], ["--secagg-degree", "needs --secagg secagg+"]),
    (["--secagg", "secagg+", "--secagg-degree", "3"], ["--secagg-degree", "even"]),
    (["--secagg", "secagg+", "--secagg-threshold", "0"], ["--secagg-threshold", "(0, 1]"]),
    (["--secagg", "secagg+", "--secagg-clip-range", "-1"], ["--secagg-clip-range", "> 0"]),
    (["--secagg", "secagg+", "--dp-clip", "1", "--secagg-clip-range", "2"], ["--secagg-clip-range", "--dp-clip"]),
    (["--secagg", "secagg+", "--max-norm-ratio", "3"], ["--max-norm-ratio", "--secagg", "cannot see"]),
    (["--secagg", "secagg+", "--strategy", "scaffold"], ["--strategy", "scaffold", "--secagg"]),
    (["--attack", "alie", "--attack-fraction", "1"], ["--attack-fraction", "[0, 1)"]),
    (["--attack", "alie", "--attack-fraction", "-0.1"], ["--attack-fraction", "[0, 1)"]),
    (["--attack-fraction", "0.2"], ["--attack-fraction", "needs --attack"]),
    (["--attack", "poison"], ["--attack", "label-flip", "backdoor"]),
    (["--attack", "ipm", "--alie-z", "1"], ["--alie-z", "only the alie attack"]),
    (["--attack", "backdoor", "--backdoor-target", "10"], ["--backdoor-target", "[0, 9]"]),
    (["--rule", "mean"], ["--rule", "median", "bulyan"]),
    (["--rule", "trimmed-mean", "--trim", "0.5"], ["--trim", "[0, 0.5)"]),
    (["--trim", "0.1"], ["--trim", "only trimmed-mean take it"]),
    (["--rule", "krum", "--krum-f", "1"], ["--krum-f", "[0, 0]", "n > 2f + 2", "n = 4"]),  # 4 clients per round
    (["--rule", "bulyan", "--krum-f", "1"], ["--krum-f", "[0, 0]", "n >= 4f + 3"]),
    (["--rule", "krum", "--krum-f", "0", "--krum-m", "5"], ["--krum-m", "[1, 4]"]),
    (["--rule", "centered-clipping", "--clip-tau", "0"], ["--clip-tau", "> 0"]),
    (["--rule", "median", "--dp-clip", "1"], ["--rule", "--dp-clip"]),
    (["--secagg", "secagg+", "--rule", "median"], ["--rule", "not with --secagg", "masks"]),
    (["--secagg", "secagg+", "--attack", "alie"], ["--attack", "not with --secagg"]),
]


@pytest.mark.parametrize("extra, expected", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_flag_exits_2_naming_flag_and_range(extra, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fedrun.main(["run", *TINY, *NO_RAY, *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    last = err.strip().splitlines()[-1]
    assert "error:" in last and all(e in last for e in expected), err
    assert not (tmp_path / "o").exists()  # failed before any training


@pytest.mark.parametrize("extra, expected", [
    (["--executor", "ray-tasks", "--chunk-size", "4"], ["--chunk-size", "ray-tasks executor does not take it"]),
    (["--executor", "actor-pool", "--cpus", "2", "--workers", "3"], ["--workers", "[1, 2]"]),
    (["--executor", "actor-pool", "--no-ray"], ["--no-ray", "not allowed with --executor actor-pool"]),
], ids=["chunk-size-on-tasks", "workers-over-cpus", "no-ray-and-pool"])
def test_bad_executor_flags_exit_before_ray_starts(extra, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fh, "init_ray", lambda *a, **k: pytest.fail("Ray started before the flags were checked"))
    with pytest.raises(SystemExit) as exc:
        fedrun.main(["run", *TINY, *extra, "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and all(e in last for e in expected), last
    assert not (tmp_path / "o").exists()


def test_bad_config_values_are_refused(tmp_path, capsys):
    for content, expected in [({"fraction": 0}, ["--fraction", "(0, 1]"]), ({"nope": 1}, ["unknown key 'nope'"]),
                              ({"no_ray": "yes"}, ["no_ray", "true or false"]), ({"lr": float("nan")}, ["--lr"]),
                              ({"deadline": float("inf")}, ["--deadline", "'inf'"])]:
        (tmp_path / "c.json").write_text(json.dumps(content))
        with pytest.raises(SystemExit) as exc:
            fedrun.main(["run", "--config", str(tmp_path / "c.json"), *NO_RAY])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and all(e in err for e in expected), err


def test_library_errors_are_one_line_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:  # a ValueError from fed_helpers, not a traceback
        fedrun.main(["run", "--dataset", "synthetic", "--clients", "6001", *NO_RAY])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fedrun: error: argument --clients: num_clients must be an integer in [1, 6000] (the number of "
        "samples), got 6001")


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "fedrun"
    assert script.exists(), "fedrun is not installed: pip install --no-deps -e ."
    assert "from fedrun import main" in script.read_text()


def test_help_lists_every_choice_and_default(capsys):
    with pytest.raises(SystemExit) as exc:
        fedrun.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks
    assert exc.value.code == 0
    for name in [*fh.STRATEGIES, *fh.PARTITIONERS, *fh.MODELS, *fh.DATASETS, *fedrun.EXECUTORS, *fh.FAULTS]:
        assert name in text
    for fragment in ["--clients CLIENTS number of clients", "(default: 10)", "(default: fedavg)",
                     "(default: fedprox 0.01)", "(default: fedavgm 1, fedadam 0.01, fedyogi 0.01, scaffold 1)",
                     "a number in (0, 1] (default: 1.0)", "a number in [0, 1) (default: 0.0)",
                     "(default: actor-pool)", "a finite number > 0 (default: None",
                     "a number in [0, 1] (default: 0.0)"]:
        assert fragment in text
    _, subs = fedrun.build_parser()
    for action in subs["run"]._actions:
        assert action.option_strings[-1] in text
    assert text.count("(default:") == len(subs["run"]._actions) - 1  # every flag but --help


def test_compare_tiny_grid_then_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY[:6], "--rounds", "1", "--train-samples", "800", *NO_RAY, "--mu", "0.5",
            "--strategies", "fedavg", "fedprox", "--splits", "iid", "dirichlet:0.5", "--seeds", "0",
            "--out", str(out)]
    assert fedrun.main(argv) == 0
    first = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert table in first and (out / "compare.png").stat().st_size > 1000
    assert set(results["table"]) == {"fedavg", "fedprox"}
    for strategy in ("fedavg", "fedprox"):
        assert set(results["table"][strategy]) == {"iid", "dirichlet:0.5"}
        cells = []
        for split, folder in (("iid", "iid"), ("dirichlet:0.5", "dirichlet-0.5")):
            rec = load_record(out / folder / strategy / "seed0")
            assert rec["config"]["strategy_knobs"] == ({"mu": 0.5} if strategy == "fedprox" else {})
            assert results["table"][strategy][split]["mean"] == rec["final_accuracy"]
            assert checkpoint_round(out / folder / strategy / "seed0") == 1
            cells.append(f"{100 * rec['final_accuracy']:.2f} ± 0.00")
        assert any(line.startswith(f"| {strategy} |") and all(c in line for c in cells) for line in table.splitlines())
    assert load_record(out / "dirichlet-0.5" / "fedavg" / "seed0")["config"]["partition_knobs"]["alpha"] == 0.5

    kept = out / "iid" / "fedavg" / "seed0" / "history.json"
    mtime = kept.stat().st_mtime_ns
    (out / "iid" / "fedprox" / "seed0" / "history.json").unlink()  # as if stopped after its checkpoint
    assert fedrun.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("skip ") == 3 and second.count("done ") == 1
    assert "done iid fedprox seed0" in second and "(resumed after round 1)" in second
    assert kept.stat().st_mtime_ns == mtime and (out / "table.md").read_text() == table

    argv[argv.index("--rounds") + 1] = "2"  # more rounds: every run continues from its checkpoint
    assert fedrun.main(argv) == 0
    assert capsys.readouterr().out.count("(resumed after round 1)") == 4
    assert [h["round"] for h in load_record(out / "iid" / "fedavg" / "seed0")["history"]] == [1, 2]


def test_compare_restarts_a_run_whose_checkpoint_has_other_settings(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY[:6], "--rounds", "1", "--train-samples", "400", *NO_RAY, "--strategies", "fedavg",
            "--splits", "iid", "--seeds", "0", "--out", str(out)]
    assert fedrun.main(argv) == 0
    (out / "iid" / "fedavg" / "seed0" / "history.json").unlink()
    assert fedrun.main([*argv, "--lr", "0.2"]) == 0
    text = capsys.readouterr().out
    assert "restart iid fedavg seed0: checkpoint" in text and "config differ" in text
    rec = load_record(out / "iid" / "fedavg" / "seed0")
    assert rec["config"]["lr"] == 0.2 and rec["resumed_after"] == 0


def test_compare_strategy_specs_set_knobs_for_one_strategy_alone(tmp_path, capsys):
    """--server-lr would also change SCAFFOLD's server step: NAME:KNOB=VALUE sets it for one strategy."""
    out = tmp_path / "cmp"
    argv = ["compare", *TINY[:6], "--rounds", "1", "--train-samples", "400", *NO_RAY, "--mu", "0.5",
            "--strategies", "scaffold", "fedadam:server_lr=0.03,beta1=0.5", "fedprox:mu=0.2", "--splits", "iid",
            "--seeds", "0", "--out", str(out)]
    assert fedrun.main(argv) == 0
    assert load_record(out / "iid" / "scaffold" / "seed0")["config"]["strategy_knobs"]["server_lr"] == 1.0
    adam = load_record(out / "iid" / "fedadam-server_lr=0.03_beta1=0.5" / "seed0")["config"]
    assert adam["strategy"] == "fedadam"
    assert adam["strategy_knobs"]["server_lr"] == 0.03 and adam["strategy_knobs"]["beta1"] == 0.5
    prox = load_record(out / "iid" / "fedprox-mu=0.2" / "seed0")["config"]
    assert prox["strategy_knobs"] == {"mu": 0.2}  # the spec beats the --mu flag
    assert "| fedadam:server_lr=0.03,beta1=0.5 |" in (out / "table.md").read_text()
    for bad, expected in [("fedadam:mu=0.1", "mu=0.1"), ("fedprox:mu=-1", ">= 0"), ("nope", "one of"),
                          ("fedadam:server_lr=0", "> 0"), ("fedadam:server_lr=inf", "'inf'")]:
        with pytest.raises(SystemExit) as exc:
            fedrun.main([*argv[:-6], "--strategies", bad, "--splits", "iid", "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "--strategies" in err and expected in err, err


def test_attack_and_rule_flags_reach_the_engine(tmp_path):
    """--attack, --attack-fraction, --rule and their knobs build notebook 11's pieces: the same bits as the
    engine given those pieces, and the backdoor's success in the record."""
    folder = tmp_path / "attacked"
    assert fedrun.main(["run", *TINY, *NO_RAY, "--clients", "8", "--attack", "backdoor", "--attack-fraction", "0.25",
                        "--backdoor-boost", "3", "--rule", "trimmed-mean", "--trim", "0.25", "--out", str(folder)]) == 0
    rec = load_record(folder)
    cfg = rec["config"]
    assert cfg["attack"] == {"name": "backdoor", "fraction": 0.25, "knobs": {"boost": 3.0}}
    assert cfg["rule"] == {"name": "trimmed-mean", "knobs": {"trim": 0.25}}
    task = fedrun.prepare(cfg, fedrun.subset(cfg, fedrun.load_data("synthetic", None)))[0]
    policy = fh.Adversary(attack=fh.Backdoor(boost=3.0), attack_fraction=0.25, num_clients=8)
    model, _ = fh.run_rounds(task, 2, policy=policy, aggregate=fh.TrimmedMean(0.25), progress=False)
    assert same_weights(model, load_model(folder))
    assert rec["backdoor_success"] == fh.backdoor_success(model, *task.test, 0)


def test_krum_f_defaults_to_the_expected_attackers_per_round(tmp_path):
    args = fedrun.build_parser()[0].parse_args(["run", "--clients", "100", "--fraction", "0.2", "--attack", "ipm",
                                                "--attack-fraction", "0.3", "--rule", "multi-krum"])
    assert fedrun.attack_config(args, "ipm", 0.3, "multi-krum", True)["rule"]["knobs"] == {"f": 6}
    assert fedrun.attack_config(args, None, None, "krum", True)["rule"]["knobs"] == {"f": 4}  # 0.2 without attack
    assert fedrun.attack_config(args, "ipm", 0.3, "bulyan", True)["rule"]["knobs"] == {"f": 4}  # (20 - 3) // 4


def test_matrix_tiny_grid_then_resume(tmp_path, capsys):
    out = tmp_path / "mx"
    argv = ["matrix", *TINY[:4], "--clients", "6", "--fraction", "1", "--rounds", "1", "--train-samples", "600",
            *NO_RAY, "--rules", "fedavg", "median", "--attacks", "sign-flip", "backdoor", "--attack-fractions", "0.2",
            "0.4", "--splits", "iid", "--out", str(out)]
    assert fedrun.main(argv) == 0
    first = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table in first and (out / "curves-iid.png").stat().st_size > 1000
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 * (1 + 2 * 2)  # each rule: no attack, and 2 attacks x 2 fractions
    for r in runs:
        rec = load_record(out / "iid" / r["rule"] / f"{r['attack']}-{r['attack_fraction']:g}" / "seed0")
        assert rec["final_accuracy"] == r["final_accuracy"] and rec["backdoor_success"] == r["backdoor_success"]
        assert rec["config"].get("attack", {}).get("fraction", 0.0) == r["attack_fraction"]
        assert f"{100 * r['final_accuracy']:.2f}" in table
    assert "| rule | none @ 0 | sign-flip @ 0.2 | sign-flip @ 0.4 | backdoor @ 0.2 | backdoor @ 0.4 |" in table
    flipped = load_record(out / "iid" / "fedavg" / "sign-flip-0.4" / "seed0")["weights_sha256"]
    assert flipped != load_record(out / "iid" / "fedavg" / "none-0" / "seed0")["weights_sha256"]
    kept = out / "iid" / "median" / "none-0" / "seed0" / "history.json"
    mtime = kept.stat().st_mtime_ns
    (out / "iid" / "fedavg" / "backdoor-0.2" / "seed0" / "history.json").unlink()  # as if stopped
    assert fedrun.main(argv) == 0
    assert kept.stat().st_mtime_ns == mtime and (out / "table.md").read_text() == table
    with pytest.raises(SystemExit) as exc:  # Bulyan cannot run on 6 clients with f = 1 assumed
        fedrun.main([*argv[:-1], str(tmp_path / "bad"), "--rules", "bulyan", "--krum-f", "1"])
    assert exc.value.code == 2 and "--krum-f" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
