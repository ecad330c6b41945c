"""The `fedrun` command: tiny experiments end to end, config files, bad flags, and `compare`.

One run goes through a real subprocess (`python -m fedrun`); the rest call `fedrun.main` in this
process, which parses the same argv and exits with the same status. Only one test starts Ray.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fed_helpers as fh
import fedrun

ROOT = Path(__file__).resolve().parents[1]
# synthetic data, 800 training samples, a linear model: a run takes well under a second
TINY = ["--dataset", "synthetic", "--model", "simple", "--clients", "4", "--rounds", "2", "--train-samples", "800",
        "--batch-size", "16", "--lr", "0.1", "--seed", "3"]


def load_record(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One FedProx run through the real command line, without Ray."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = subprocess.run([sys.executable, "-m", "fedrun", "run", *TINY, "--strategy", "fedprox", "--no-ray",
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
    assert set(rec["versions"]) >= {"python", "torch", "numpy", "ray"}
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [h["round"] for h in rec["history"]] == [1, 2]
    assert [float(r["accuracy"]) for r in rows] == [h["accuracy"] for h in rec["history"]]
    assert rec["final_accuracy"] == rec["history"][-1]["accuracy"]
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    model = fh.make_model("simple")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert fedrun.weights_sha256(model) == rec["weights_sha256"]
    assert fh.evaluate(model, *synthetic_test)[1] == rec["final_accuracy"]


def test_same_seed_same_weights_with_and_without_ray(cli_run, tmp_path):
    _, out = cli_run
    expected = load_record(out)["weights_sha256"]
    assert fedrun.main(["run", *TINY, "--strategy", "fedprox", "--no-ray", "--out", str(tmp_path / "a")]) == 0
    assert load_record(tmp_path / "a")["weights_sha256"] == expected
    assert fedrun.main(["run", *TINY, "--strategy", "fedprox", "--cpus", "2", "--out", str(tmp_path / "ray")]) == 0
    rec = load_record(tmp_path / "ray")
    assert rec["runtime"]["use_ray"] and rec["weights_sha256"] == expected


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


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps({"dataset": "synthetic", "model": "simple", "train_samples": 400, "rounds": 3,
                                  "strategy": "fedprox", "mu": 0.5, "no_ray": True, "clients": 2}))
    assert fedrun.main(["run", "--config", str(config), "--rounds", "1", "--clients", "3",
                        "--out", str(tmp_path / "o")]) == 0
    rec = load_record(tmp_path / "o")
    assert rec["config"]["rounds"] == 1 and len(rec["history"]) == 1 and rec["config"]["clients"] == 3
    assert rec["config"]["strategy_knobs"] == {"mu": 0.5} and rec["config"]["train_samples"] == 400


BAD = [  # extra flags, what stderr must say (the flag, its allowed range)
    (["--fraction", "0"], ["--fraction", "(0, 1]"]),
    (["--fraction", "1.5"], ["--fraction", "(0, 1]"]),
    (["--clients", "0"], ["--clients", ">= 1"]),
    (["--alpha", "-1"], ["--alpha", "> 0"]),
    (["--strategy", "nope"], ["--strategy", "fedavg", "scaffold"]),
    (["--mu", "-1"], ["--mu", ">= 0"]),
    (["--mu", "0.1"], ["--mu", "'fedavg' does not take it", "no knobs"]),
    (["--partition", "dirichlet", "--beta", "0.5"], ["--beta", "takes --alpha, --min-size"]),
    (["--rounds", "0"], ["--rounds", ">= 1"]),
    (["--momentum", "1"], ["--momentum", "[0, 1)"]),
    (["--lr", "nan"], ["--lr", "> 0"]),
    (["--clients", "801"], ["--clients", "[1, 800]"]),  # checked by fed_helpers, after loading the data
    (["--partition", "classes", "--classes-per-client", "11"], ["--classes-per-client", "[1, 10]"]),
    (["--train-samples", "6001"], ["--train-samples", "[1, 6000]"]),
]


@pytest.mark.parametrize("extra, expected", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_flag_exits_2_naming_flag_and_range(extra, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fedrun.main(["run", *TINY, "--no-ray", *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    last = err.strip().splitlines()[-1]
    assert "error:" in last and all(e in last for e in expected), err
    assert not (tmp_path / "o").exists()  # failed before any training


def test_bad_config_values_are_refused(tmp_path, capsys):
    for content, expected in [({"fraction": 0}, ["--fraction", "(0, 1]"]), ({"nope": 1}, ["unknown key 'nope'"]),
                              ({"no_ray": "yes"}, ["no_ray", "true or false"])]:
        (tmp_path / "c.json").write_text(json.dumps(content))
        with pytest.raises(SystemExit) as exc:
            fedrun.main(["run", "--config", str(tmp_path / "c.json"), "--no-ray"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and all(e in err for e in expected), err


def test_library_errors_are_one_line_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:  # a ValueError from fed_helpers, not a traceback
        fedrun.main(["run", "--dataset", "synthetic", "--clients", "6001", "--no-ray"])
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
    for name in [*fh.STRATEGIES, *fh.PARTITIONERS, *fh.MODELS, *fh.DATASETS]:
        assert name in text
    for fragment in ["--clients CLIENTS number of clients", "(default: 10)", "(default: fedavg)",
                     "(default: fedprox 0.01)", "(default: fedavgm 1, fedadam 0.01, fedyogi 0.01, scaffold 1)",
                     "a number in (0, 1] (default: 1.0)", "a number in [0, 1) (default: 0.0)"]:
        assert fragment in text
    _, subs = fedrun.build_parser()
    for action in subs["run"]._actions:
        assert action.option_strings[-1] in text
    assert text.count("(default:") == len(subs["run"]._actions) - 1  # every flag but --help


def test_compare_tiny_grid_then_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY[:6], "--rounds", "1", "--train-samples", "800", "--no-ray", "--mu", "0.5",
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
            cells.append(f"{100 * rec['final_accuracy']:.2f} ± 0.00")
        assert any(line.startswith(f"| {strategy} |") and all(c in line for c in cells) for line in table.splitlines())
    assert load_record(out / "dirichlet-0.5" / "fedavg" / "seed0")["config"]["partition_knobs"]["alpha"] == 0.5

    kept = out / "iid" / "fedavg" / "seed0" / "history.json"
    mtime = kept.stat().st_mtime_ns
    (out / "iid" / "fedprox" / "seed0" / "history.json").unlink()  # as if stopped during this run
    assert fedrun.main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("skip ") == 3 and second.count("done ") == 1 and "done iid fedprox seed0" in second
    assert kept.stat().st_mtime_ns == mtime and (out / "table.md").read_text() == table


def test_compare_strategy_specs_set_knobs_for_one_strategy_alone(tmp_path, capsys):
    """--server-lr would also change SCAFFOLD's server step: NAME:KNOB=VALUE sets it for one strategy."""
    out = tmp_path / "cmp"
    argv = ["compare", *TINY[:6], "--rounds", "1", "--train-samples", "400", "--no-ray", "--mu", "0.5",
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
    for bad, expected in [("fedadam:mu=0.1", "mu=0.1"), ("fedprox:mu=-1", ">= 0"), ("nope", "one of")]:
        with pytest.raises(SystemExit) as exc:
            fedrun.main([*argv[:-6], "--strategies", bad, "--splits", "iid", "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "--strategies" in err and expected in err, err
