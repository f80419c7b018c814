"""One rank of tests/memory/test_sharded.py: python -m tests.memory.sharded_ranks RANK P PORT OUT CASES.

Joins a gloo group of P ranks (tcp://127.0.0.1:PORT, a timeout on every collective), runs each case
of CASES (comma-separated names of CASES below) on the sharded model and, in the same process, on the
unsharded model with the same parameters and inputs, and writes {case: {quantity: max abs difference,
...}} as JSON to OUT.RANK. float64 throughout.
"""

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import sparsemem as sm

TIMEOUT = 20.0
"""Seconds every collective waits before the rank reports the others dead or hung."""

B, X, H, N, W, R, K, T = 3, 5, 8, 11, 4, 2, 3, 14
"""N = 11 over 2 ranks: 6 + 5 slots; T = 14 LRU writes from a fresh memory cross from one shard to the other."""


def _models(kind: str, group, index: str = "exact"):
    torch.manual_seed(0)
    cls = sm.SAM if kind == "sam" else sm.SDNC
    plain = cls(X, H, num_slots=N, word_size=W, num_reads=R, k=K, index=index).double()
    sharded = cls(X, H, num_slots=N, word_size=W, num_reads=R, k=K, index=index, shard_group=group).double()
    sharded.load_state_dict(plain.state_dict())
    sharded.memory.shard.timeout = datetime.timedelta(seconds=TIMEOUT)
    return plain, sharded


def _inputs(seed: int, steps: int = T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, steps, X, generator=g, dtype=torch.float64)


def _diff(a, b) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _compare(plain, sharded, initial=None, lengths=None, seed=1) -> dict:
    """Forward T steps and backward on both models -> the largest differences."""
    x = _inputs(seed)
    results, grads, memories = [], [], []
    for model in (plain, sharded):
        model.zero_grad()
        memory = None if initial is None else initial.clone().requires_grad_(True)
        state = model.init_state(B, memory)
        y, state = model(x, state, lengths)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + state.reads.square().sum()
        loss.backward()
        results.append((y.detach(), state))
        grads.append([p.grad.clone() for p in model.parameters()] + ([memory.grad] if memory is not None else []))
        memories.append(state.access.memory.store.dense())
    (y0, s0), (y1, s1) = results
    out = {
        "outputs": _diff(y0, y1),
        "reads": _diff(s0.reads, s1.reads),
        "read_slots": int((s0.read_weights.indices != s1.read_weights.indices).sum()),
        "read_weights": _diff(s0.read_weights.weights, s1.read_weights.weights),
        "write_slots": int((s0.write_weights.indices != s1.write_weights.indices).sum()),
        "grads": max(_diff(a, b) for a, b in zip(grads[0], grads[1], strict=True)),
        "grad_scale": max(float(g.abs().max()) for g in grads[0]),
        "memory": _diff(memories[0], memories[1]),
        "lru_blocks": s1.access.usage.local.blocks,
        "written_here": int(s1.access.memory.store.local.written[: B * sharded.memory.shard.local_slots].sum()),
    }
    if initial is not None:
        out["initial_grad"] = _diff(grads[0][-1], grads[1][-1])
    return out


def _blocked_lru(kind: str, group) -> dict:
    """_compare with every rank's LRU kept in blocks (as from N = 2^12 slots per memory) at this small N."""
    from sparsemem.memory import lru

    threshold, lru.BLOCKS_MIN_SLOTS = lru.BLOCKS_MIN_SLOTS, 1
    try:
        return _compare(*_models(kind, group), initial=_initial((N, W)) if kind == "sdnc" else None)
    finally:
        lru.BLOCKS_MIN_SLOTS = threshold


def _versions(kind: str, group) -> dict:
    """Stepping twice from one state (rollback), from an older one, and from a clone, sharded and not."""
    plain, sharded = _models(kind, group)
    xs = [_inputs(seed, 5) for seed in (2, 3, 4)]
    out = {}
    ys = {}
    for name, model in (("plain", plain), ("sharded", sharded)):
        with torch.no_grad():
            _, s1 = model(xs[0])
            a, s2 = model(xs[1], s1)
            b, _ = model(xs[2], s2)
            a_again, _ = model(xs[1], s1)  # back to s1: every rank undoes its own rows
            copy = s2.clone()
            c, _ = model(xs[2], copy)
            d, _ = model(xs[1], s1)
            e, _ = model(xs[2], s2)  # forward again from s2, after the rollback
        ys[name] = (a, b, a_again, c, d, e)
    a, b, a_again, c, d, e = ys["sharded"]
    out["rollback"] = max(_diff(a, a_again), _diff(a, d))
    out["clone"] = _diff(b, c)
    out["redo"] = _diff(b, e)
    out["vs_plain"] = max(_diff(p, s) for p, s in zip(ys["plain"], ys["sharded"], strict=True))
    return out


def _kill(rank: int, group) -> dict:
    """Rank 1 dies after one step; rank 0's next step reports it within the timeout."""
    _, sharded = _models("sam", group)
    x = _inputs(5, 2)
    with torch.no_grad():
        _, state = sharded(x[:, :1])
        if rank == 1:
            os._exit(3)
        start = time.monotonic()
        try:
            sharded(x[:, 1:], state)
        except RuntimeError as error:
            return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - start}
    return {"error": None}


def _errors(group) -> dict:
    """Bad arguments, each -> its message."""
    messages = {}
    for name, make in {
        "too_few_slots": lambda: sm.SAM(X, H, num_slots=1, word_size=W, num_reads=R, k=1, shard_group=group),
        "not_a_group": lambda: sm.SDNC(X, H, num_slots=N, word_size=W, num_reads=R, k=K, shard_group="world"),
        "batch_differs": lambda: _models("sam", group)[1].init_state(2 + dist.get_rank()),
    }.items():
        try:
            make()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


CASES = {
    "sam_fresh": lambda rank, group: _compare(*_models("sam", group)),
    "sam_shared": lambda rank, group: _compare(*_models("sam", group), initial=_initial((N, W))),
    "sam_padded": lambda rank, group: _compare(*_models("sam", group), lengths=torch.tensor([T, 5, 9])),
    "sdnc_fresh": lambda rank, group: _compare(*_models("sdnc", group)),
    "sdnc_per_sample": lambda rank, group: _compare(*_models("sdnc", group), initial=_initial((B, N, W))),
    "sdnc_shared": lambda rank, group: _compare(*_models("sdnc", group), initial=_initial((N, W))),
    "sam_blocked_lru": lambda rank, group: _blocked_lru("sam", group),
    "sdnc_blocked_lru": lambda rank, group: _blocked_lru("sdnc", group),
    "sam_versions": lambda rank, group: _versions("sam", group),
    "sdnc_versions": lambda rank, group: _versions("sdnc", group),
    "errors": lambda rank, group: _errors(group),
    "kill": _kill,
}


def _initial(shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def main(argv: list[str]) -> None:
    rank, size, port, out, cases = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4].split(",")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=TIMEOUT),
    )
    results = {}
    try:
        for case in cases:
            results[case] = CASES[case](rank, dist.group.WORLD)
    finally:
        with open(f"{out}.{rank}", "w") as file:
            json.dump(results, file)
    if "kill" in cases:  # the gloo group's destructor may abort after a peer died: leave without it
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
