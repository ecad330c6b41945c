"""Draft of fed_helpers' section 08 (issue 5): paste after section 07 of fed_helpers.py; needs `import hashlib, json`."""


# ----------------------------------------------------------------------------
# 08_when_clients_fail: stragglers, crashes, bad updates, checkpoint and resume
# ----------------------------------------------------------------------------

FAULTS = ("crash", "kill", "slow", "nan")


def assign_faults(clients: Sequence[int], seed: int, round_idx: int, crash: float = 0.0, kill: float = 0.0,
                  slow: float = 0.0, nan: float = 0.0) -> dict[int, str]:
    """Fault injection: {client id: fault} for this round's `clients`. Each client draws at
    most one fault: "crash" (raises), "kill" (its worker process exits), "slow" (answers
    long after any deadline) or "nan" (sends NaN weights), with the given probabilities.
    The draw depends on (seed, round, client) only, so a faulty run is reproducible.
    Introduced in 08_when_clients_fail.
    """
    rates = {"crash": crash, "kill": kill, "slow": slow, "nan": nan}
    for name, rate in rates.items():
        _check_knob(name, rate, 0, 1)
    if sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"the fault rates crash + kill + slow + nan must add up to at most 1, "
                         f"got {sum(rates.values()):g}")
    out = {}
    for k in clients:
        u = np.random.default_rng([seed, round_idx, int(k), 8]).random()
        for name, rate in rates.items():
            if u < rate:
                out[int(k)] = name
                break
            u -= rate
    return out


def faulty_client(
    model_name: str, weights: np.ndarray, x_all: np.ndarray, y_all: np.ndarray, indices: np.ndarray,
    epochs: int, batch_size: int, lr: float, seed: int, momentum: float = 0.0, weight_decay: float = 0.0,
    payload: tuple[str, object] | None = None, fault: str | None = None, slow_s: float = 60.0,
) -> tuple[int, float, np.ndarray]:
    """`train_client_flat`, with the injected `fault` (see `assign_faults`) acted out.
    "kill" ends the process it runs in: call it only in a Ray worker. Introduced in 08_when_clients_fail.
    """
    if fault == "crash":
        raise RuntimeError("injected fault: the client crashed")
    if fault == "kill":
        os._exit(1)  # the worker process dies mid-task, as on an out-of-memory kill
    if fault == "slow":
        time.sleep(slow_s)
    n, loss, w = train_client_flat(make_model(model_name), weights, x_all, y_all, indices, epochs, batch_size, lr,
                                   seed, momentum, weight_decay, payload)
    return (n, loss, np.full_like(w, np.nan)) if fault == "nan" else (n, loss, w)


# A dead worker is retried once (the task is a pure function: safe to rerun); an exception is not.
faulty_client_remote = ray.remote(num_cpus=1, max_retries=1, retry_exceptions=False)(faulty_client)


def describe_error(err: BaseException) -> str:
    """One line for the history: the error's type and first line (a Ray task error: its cause's).

    Introduced in 08_when_clients_fail.
    """
    cause = getattr(err, "cause", None) or err
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first}"[:200]


def check_update(client_w: object, global_w: torch.Tensor) -> str | None:
    """Why a client's returned weights must not be averaged (not a float32 vector of the
    global model's shape, NaN or Inf), or None if they may. Introduced in 08_when_clients_fail.
    """
    shape = tuple(global_w.shape)
    if not isinstance(client_w, np.ndarray) or client_w.dtype != np.float32 or client_w.shape != shape:
        got = f"{client_w.dtype} {client_w.shape}" if isinstance(client_w, np.ndarray) else type(client_w).__name__
        return f"wrong shape or type: expected float32 {shape}, got {got}"
    if not np.isfinite(client_w).all():
        return "NaN or Inf in the weights"
    return None


def norm_outliers(update_norms: dict[int, float], max_ratio: float) -> dict[int, str]:
    """{client: reason} for updates whose norm ||w_k - w|| exceeds `max_ratio` times the
    median of this round's norms (needs 3 or more). Introduced in 08_when_clients_fail.
    """
    if len(update_norms) < 3:
        return {}
    median = float(np.median(list(update_norms.values())))
    return {k: f"update norm {v:.3g} is over {max_ratio:g} x the median {median:.3g}"
            for k, v in update_norms.items() if v > max_ratio * median}


def server_state(strategy: FedAvg) -> dict[str, torch.Tensor | None]:
    """What a strategy has learned on the server (its tensors, e.g. momentum or control
    variates), as saved in a checkpoint; its knobs are not state. Introduced in 08_when_clients_fail.
    """
    return {k: v for k, v in vars(strategy).items() if v is None or isinstance(v, torch.Tensor)}


class RoundStore(ClientStateStore):
    """A `ClientStateStore` whose writes during a round wait in a `pending_<round>` folder
    and move into place only once the round's checkpoint is saved, so the per-client state
    on disk always matches the last checkpoint. Introduced in 08_when_clients_fail.
    """

    pending: Path | None = None

    def begin(self, round_idx: int) -> None:
        """Start collecting round `round_idx`'s writes."""
        self.pending = self.folder / f"pending_{round_idx}"
        shutil.rmtree(self.pending, ignore_errors=True)
        self.pending.mkdir()

    def put(self, cid: int, value: np.ndarray) -> None:
        if self.pending is None:
            raise RuntimeError("RoundStore.put outside a round: call begin(round) first")
        tmp = self.pending / f"client_{int(cid)}.tmp.npy"
        np.save(tmp, value)
        os.replace(tmp, self.pending / f"client_{int(cid)}.npy")

    def commit(self, pending: Path | None = None) -> None:
        """Move a round's writes into place (each by an atomic rename; safe to repeat)."""
        pending = pending or self.pending
        for f in sorted(pending.glob("client_*[0-9].npy")):
            os.replace(f, self.folder / f.name)
        shutil.rmtree(pending)
        self.pending = None

    def recover(self, last_round: int) -> None:
        """After a stop: finish the commit of rounds up to `last_round` (checkpointed), drop later ones."""
        for pending in sorted(self.folder.glob("pending_*")):
            if int(pending.name.split("_")[1]) <= last_round:
                self.commit(pending)
            else:
                shutil.rmtree(pending)


def save_checkpoint(path: Path, state: dict) -> None:
    """`torch.save(state)` to `path` atomically: written to a temporary file, flushed to
    disk, then renamed over `path`. A crash leaves the old checkpoint or the new one, never
    half of one. Introduced in 08_when_clients_fail.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: dict, strategy: FedAvg, num_params: int) -> dict:
    """Read and check a checkpoint (`weights_only=True`: tensors and plain values, no code)
    before anything is changed: a corrupt file, or one from another run, raises ValueError
    saying what is wrong. Introduced in 08_when_clients_fail.
    """
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is corrupt or unreadable ({describe_error(err)}); "
                         "delete it to start this run afresh") from err
    needed = {"format", "round", "weights", "strategy", "history", "fingerprint"}
    if not isinstance(state, dict) or not needed <= set(state) or state["format"] != 1:
        raise ValueError(f"checkpoint {path} is not a run_resilient checkpoint (format 1 with {sorted(needed)})")
    saved = json.loads(state["fingerprint"])
    if saved != fingerprint:
        diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ValueError(f"checkpoint {path} is from a different run: {', '.join(diff)} differ; "
                         "use another run_dir, or the settings it was made with")
    w, expected = state["weights"], server_state(strategy)
    if not isinstance(w, torch.Tensor) or w.shape != (num_params,) or not torch.isfinite(w).all():
        raise ValueError(f"checkpoint {path}: the weights are not {num_params} finite numbers")
    if set(state["strategy"]) != set(expected):
        raise ValueError(f"checkpoint {path}: strategy state has {sorted(state['strategy'])}, "
                         f"{strategy.name} needs {sorted(expected)}")
    return state


def run_resilient(
    strategy: FedAvg, model_name: str, train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor], partitions: Sequence[np.ndarray], rounds: int = 10,
    client_fraction: float = 1.0, local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
    momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0, use_ray: bool = True,
    deadline_s: float | None = 300.0, min_clients: int = 1, max_norm_ratio: float | None = 20.0,
    faults: dict[str, float] | None = None, slow_s: float = 60.0, run_dir: str | Path | None = None,
    on_round: Callable[[list[dict]], None] | None = None, progress: bool = True,
) -> tuple[nn.Module, list[dict]]:
    """`run_strategy` for clients that fail. Each round waits at most `deadline_s` seconds
    (late clients are dropped and their tasks cancelled); a client that crashes, or whose
    worker dies, is left out; an update with NaN/Inf, the wrong shape, or a norm over
    `max_norm_ratio` x the round's median is rejected. The rest are averaged; with fewer
    than `min_clients` the global model is kept. `faults` injects {"crash", "kill", "slow",
    "nan": rate}. With `run_dir`, every round is checkpointed there and a rerun resumes
    from the last complete round. Without faults or late clients it gives `run_strategy`'s
    bits. A "slow" client answers after `slow_s`; one that cannot make the deadline is not run
    (on Ray the round waits for it until the deadline). In process (`use_ray=False`) a "kill"
    is a crash, and a hopeless straggler is late at once.
    Introduced in 08_when_clients_fail.
    """
    check_round_knobs(rounds, client_fraction, partitions, local_epochs, batch_size, lr, momentum, weight_decay)
    faults = dict(faults or {})
    if set(faults) - set(FAULTS):
        raise ValueError(f"faults may only name {list(FAULTS)}, got {sorted(set(faults) - set(FAULTS))}")
    assign_faults([], seed, 0, **faults)  # checks the rates
    if deadline_s is not None:
        _check_knob("deadline_s", deadline_s, 1e-3, float("inf"))
    if not isinstance(min_clients, (int, np.integer)) or not 1 <= min_clients <= len(partitions):
        raise ValueError(f"min_clients must be an integer in [1, {len(partitions)}] (the number of clients), "
                         f"got {min_clients!r}")
    if max_norm_ratio is not None:
        _check_knob("max_norm_ratio", max_norm_ratio, 1, float("inf"))
    model = make_model(model_name, seed)
    num_params = flat_weights(model).numel()
    history: list[dict] = []
    first = 1
    store = getattr(strategy, "store", None)
    if run_dir is not None:
        run_dir, fingerprint = Path(run_dir), {
            "model": model_name, "num_params": num_params, "strategy": strategy.name,
            "knobs": {k: v for k, v in vars(strategy).items() if isinstance(v, (int, float))},
            "partitions": hashlib.sha256(b"".join(np.asarray(p, np.int64).tobytes() + b"|" for p in partitions))
            .hexdigest(), "train_samples": len(train[1]), "client_fraction": client_fraction,
            "local_epochs": local_epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "seed": seed, "min_clients": int(min_clients),
            "max_norm_ratio": max_norm_ratio, "faults": faults}
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "checkpoint.pt"
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # a write that a stop cut short
        state = load_checkpoint(path, fingerprint, strategy, num_params) if path.exists() else None
        if store is not None:
            strategy.store = store = RoundStore(run_dir / "client_state")
            store.recover(state["round"] if state else 0)
        if state is not None and state["round"] > rounds:
            raise ValueError(f"run_dir {run_dir} already holds {state['round']} rounds, more than rounds={rounds}")
        if state is not None:  # all checked: now apply it
            torch.nn.utils.vector_to_parameters(state["weights"], model.parameters())
            for k, v in state["strategy"].items():
                setattr(strategy, k, v)
            history, first = json.loads(state["history"]), state["round"] + 1
    x_all, y_all = train[0].numpy(), train[1].numpy()
    if use_ray:
        init_ray()
        x_all, y_all = ray.put(x_all), ray.put(y_all)
    pending: dict = {}
    try:  # however the loop ends (even Ctrl-C), cancel what is still running
        for rnd in tqdm(range(first, rounds + 1), desc=f"rounds ({strategy.name})", disable=not progress,
                        initial=first - 1, total=rounds):
            start = time.perf_counter()
            clients = [int(k) for k in sample_clients(len(partitions), client_fraction, seed, rnd)]
            fault_of = assign_faults(clients, seed, rnd, **faults)
            w = flat_weights(model)
            payloads = {k: strategy.payload(k, w) for k in clients}
            if isinstance(store, RoundStore):
                store.begin(rnd)
            results, failed, late = {}, {}, []
            jobs = {k: (partitions[k], local_epochs, batch_size, lr, client_seed(seed, rnd, k), momentum,
                        weight_decay, payloads[k]) for k in clients}
            if use_ray:
                w_ref = ray.put(w.numpy())
                # An injected straggler that cannot make the deadline is not run at all: its device is slow,
                # not our CPU. The server cannot know that, so it waits for it until the deadline.
                silent = [k for k in clients if fault_of.get(k) == "slow" and deadline_s is not None
                          and slow_s >= deadline_s]
                pending = {faulty_client_remote.remote(model_name, w_ref, x_all, y_all, *jobs[k], fault_of.get(k),
                                                       slow_s): k for k in clients if k not in silent}
                while pending:
                    left = None if deadline_s is None else max(0.0, deadline_s - (time.perf_counter() - start))
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
                    if not done:
                        break  # the deadline has passed
                    k = pending.pop(done[0])
                    try:
                        results[k] = ray.get(done[0])
                    except Exception as err:  # the client raised, or its worker died (after Ray's retry)
                        failed[k] = describe_error(err)
                for ref, k in pending.items():
                    ray.cancel(ref, force=True)  # stop the straggler's work and free its CPU (a new worker replaces it)
                    late.append(k)
                pending = {}
                if silent:
                    time.sleep(max(0.0, deadline_s - (time.perf_counter() - start)))
                    late += silent
            else:
                for k in clients:  # a straggler that cannot make the deadline is late at once (no waiting here)
                    if (fault_of.get(k) == "slow" and deadline_s is not None and slow_s >= deadline_s) or (
                            deadline_s is not None and time.perf_counter() - start > deadline_s):
                        late.append(k)
                        continue
                    try:
                        fault = "crash" if fault_of.get(k) == "kill" else fault_of.get(k)
                        results[k] = faulty_client(model_name, w.numpy(), x_all, y_all, *jobs[k], fault)
                    except Exception as err:
                        failed[k] = describe_error(err)
            rejected, norms = {}, {}
            for k in sorted(results):
                reason = check_update(results[k][2], w)
                if reason is None:
                    norms[k] = float(np.linalg.norm(results[k][2].astype(np.float64) - w.double().numpy()))
                else:
                    rejected[k] = reason
            rejected.update(norm_outliers(norms, max_norm_ratio) if max_norm_ratio is not None else {})
            accepted = [k for k in clients if k in results and k not in rejected]  # client-id order
            aggregated = len(accepted) >= min_clients
            drift, train_loss = None, None
            if aggregated:
                sizes = np.array([results[k][0] for k in accepted], dtype=np.float64)
                coef = sizes / sizes.sum()
                avg = torch.zeros(len(w), dtype=torch.float64)
                spread = 0.0
                for k, c in zip(accepted, coef):  # client-id order: a fixed summation order
                    n, _, w_k = results[k]
                    w_k = torch.tensor(w_k)  # a copy: arrays from Ray are read-only
                    avg += float(c) * w_k.to(torch.float64)
                    spread += float(c) * float((w_k.double() - w.double()).square().sum())
                    strategy.receive(k, w, w_k, local_steps(n, local_epochs, batch_size), lr)
                drift = math.sqrt(max(spread - float((avg - w.double()).square().sum()), 0.0))
                train_loss = float(np.dot(sizes, [results[k][1] for k in accepted]) / sizes.sum())
                torch.nn.utils.vector_to_parameters(strategy.server_step(w, avg), model.parameters())
            elif progress:
                tqdm.write(f"round {rnd}: {len(accepted)} usable updates < min_clients={min_clients}: "
                           "the global model is kept")
            loss, acc = evaluate(model, *test)
            history.append({
                "round": rnd, "accuracy": acc, "loss": loss, "train_loss": train_loss, "drift": drift,
                "clients": len(accepted), "sampled": clients, "accepted": accepted,
                "failed": {str(k): v for k, v in sorted(failed.items())}, "late": sorted(late),
                "rejected": {str(k): v for k, v in sorted(rejected.items())},
                "faults": {str(k): v for k, v in sorted(fault_of.items())}, "aggregated": aggregated,
                "seconds": time.perf_counter() - start,
                "bytes_sent": (len(clients) + len(results)) * w.numel() * 4
                + sum(payload_bytes(p) for p in payloads.values()),
            })
            if run_dir is not None:
                save_checkpoint(path, {"format": 1, "round": rnd, "weights": flat_weights(model),
                                       "strategy": server_state(strategy), "history": json.dumps(history),
                                       "fingerprint": json.dumps(fingerprint)})
                if isinstance(store, RoundStore):
                    store.commit()
            if on_round is not None:
                on_round(history)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return model, history
