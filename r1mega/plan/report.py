"""Console tables (rich), JSON for tools, and the flat W&B dict: three views of one result dict."""
from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from r1mega.plan import flat


NA = "n/a"  # a number that does not exist (e.g. the time of a rollout that cannot run); the note says why


def _f(x, unit: str = "", nd: int = 1) -> str:
    if x is None:
        return NA
    if isinstance(x, float):
        return f"{x:,.{nd}f}{unit}"
    return f"{x:,}{unit}"


def _table(con: Console, title: str, *cols: str) -> Table:
    con.print(f"\n[bold]{title}")  # above the table: a table title would wrap at the table's width
    t = Table(show_edge=False, pad_edge=False)
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def _count(n: float, nd: int = 1) -> str:
    """Parameters in B, or in M below 1B (a proxy model is not "0.0B")."""
    return f"{n / 1e9:.{nd}f}B" if n >= 1e9 else f"{n / 1e6:.{nd}f}M"


def headline(r: dict, gpu_memory_gb: float) -> str:
    """The verdict in one line: fits or not, the key number, and what the search found."""
    tm, v = r["train_memory"], r["verdict"]
    where = f"{r['model']['name']} on {r['num_gpus']} x {r['cluster']}"
    if v["fits"]:
        what = "per RL step" if r["rollout_layout"] else "per training step"
        s = r["step_s"]
        step = f"{_f(s, ' s', nd=0 if s >= 10 else 2)} {what}" if s is not None else f"time {what} n/a"
        return (f"FITS: {where}, {r['layout']}: {tm['total_gb']:.1f} of {gpu_memory_gb:.0f} GB per GPU "
                f"(worst stage), {step}")
    n = r["feasible_layouts"]
    if not n:
        found = f"no layout of {r['num_gpus']} GPUs fits"
    else:
        best = r["search"][0]
        found = f"{n} other layout(s) fit, fastest: {best['layout']} ({_f(best['train_gb'])} GB, {_f(best['step_s'], ' s', nd=0)} per step)"
    return f"DOES NOT FIT: {where}, {r['layout']}: {v['limit']}: {v['reason']}; {found}"


def render(r: dict, gpu_memory_gb: float, console: Console | None = None) -> None:
    con = console or Console(width=120)
    con.print(headline(r, gpu_memory_gb), style="bold green" if r["verdict"]["fits"] else "bold red", markup=False,
              highlight=False, soft_wrap=True)
    m = r["model"]
    con.print(f"[bold]r1mega plan[/]: {m['name']} ({_count(m['total_params'])} total, "
              f"{_count(m['active_params'])} active) on {r['num_gpus']} x {r['cluster']}")
    con.print(f"training layout ({r['layout_source']}): {r['layout']}   rollout ({r['rollout_source']}): "
              f"{r['rollout_layout'] or 'none (rl=false: no rollout phase)'}")

    tm = r["train_memory"]
    t = _table(con, f"Training memory per GPU: worst stage {tm['stage']} ({tm['layers']} layers)", "component", "GB", "note")
    t.add_row("weights", _f(tm["weights_gb"]), f"{_count(tm['params'], 2)} params on this GPU")
    t.add_row("gradients", _f(tm["grads_gb"]), "fp32 main_grad")
    t.add_row("optimizer", _f(tm["optimizer_gb"]), f"sharded over DP={tm['dp']}, expert DP={tm['expert_dp']}")
    t.add_row("fp8 weight copies", _f(tm["fp8_copies_gb"]), "model.fp8")
    t.add_row("activations", _f(tm["activations_gb"]),
              f"{tm['in_flight_microbatches']:.0f} microbatches in flight of {tm['microbatches']}")
    t.add_row("reference model", _f(tm["ref_model_gb"]), "ref_on_gpu")
    t.add_row("reserved", _f(tm["reserved_gb"]), "CUDA context, NCCL, fragmentation")
    t.add_row("[bold]total", f"[bold]{_f(tm['total_gb'])}", f"of {gpu_memory_gb:.0f} GB")
    t.add_row("host: optimizer offload", _f(tm["host_optimizer_gb"]), "per GPU")
    t.add_row("host: reference model", _f(tm["host_ref_model_gb"]), "per GPU")
    t.add_row("host: states during rollout", _f(tm["host_rollout_offload_gb"]), "per GPU")
    t.add_row("host per node", _f(tm["host_per_node_gb"], nd=0), "peak")
    con.print(t)

    rm, rt = r["rollout_memory"], r["rollout_time"]
    if rm:
        t = _table(con, f"Rollout memory per GPU ({r['rollout_layout']}, {rm['budget_gb']:.1f} GB budget)", "item", "value")
        t.add_row("weights", _f(rm["weights_gb"], " GB"))
        t.add_row("activation reserve", _f(rm["activation_reserve_gb"], " GB"))
        t.add_row("KV cache", _f(rm["kv_cache_gb"], " GB"))
        t.add_row("KV bytes per token (all layers)", _f(rm["kv_bytes_per_token"], nd=0))
        t.add_row("KV tokens per GPU / per engine", f"{rm['kv_tokens_per_gpu']:,} / {rm['kv_tokens_per_engine']:,}")
        t.add_row("concurrent sequences per engine", _f(rm["concurrent_seqs_per_engine"]))
        t.add_row("training states left on GPU", _f(rm["train_states_resident_gb"], " GB"))
        con.print(t)

    tt, ws = r["train_time"], r["weight_sync"]
    t = _table(con, "Time per RL step", "phase", "seconds", "note")
    if rt:
        t.add_row("rollout prefill", _f(rt["prefill_s"]), "FLOP-bound")
        if rt["waves"] is None:  # the KV cache holds no whole sequence: decode never finishes
            t.add_row("rollout decode", NA, "cannot run: the KV cache holds no whole sequence")
        else:
            t.add_row("rollout decode", _f(rt["decode_s"]),
                      f"{_f(rt.get('decode_step_ms'), ' ms')}/token x {rt['waves']} waves of {rt['batch_per_engine']} "
                      f"seqs x {rt['engines']} engines, {rt.get('decode_bound', 'n/a')}-bound")
        t.add_row("ref + old-policy forwards", _f(tt["ref_old_forward_s"]), "")
    t.add_row("training compute", _f(tt["train_compute_s"]), "6 x active params x tokens / MFU (8 x with full recompute)")
    t.add_row("pipeline bubble", _f(tt["pipeline_bubble_s"]), f"{tt['bubble_fraction']:.0%} of compute")
    t.add_row("exposed communication", _f(tt["comm_exposed_s"]), "")
    t.add_row("optimizer offload (PCIe)", _f(tt["optimizer_offload_s"]), "")
    if rt:
        t.add_row("state swap around rollout", _f(tt["offload_swap_s"]), "to host and back over PCIe")
        t.add_row("weight sync", _f(ws["estimate_s"]),
                  f"{ws['model_gb']:.0f} GB; theory {ws['theory_s']:.2f} s (network {ws['network_floor_s']:.2f}, "
                  f"NVLink {ws['nvlink_floor_s']:.2f})")
    t.add_row("[bold]step", f"[bold]{_f(r['step_s'])}", "" if r["step_s"] is not None else "no step: the rollout cannot run")
    con.print(t)

    t = _table(con, "Training communication per GPU per step", "group", "GB", "seconds")
    for k, gb in tt["comm_gb"].items():
        t.add_row(k, _f(gb), _f(tt["comm_s"][k], nd=2))
    con.print(t)

    v = r["verdict"]
    con.print("\n[bold green]FITS[/]" if v["fits"] else f"[bold red]DOES NOT FIT[/]: {v['limit']}: {v['reason']}")

    if not r["search"]:
        con.print(f"\n[bold]Best feasible layouts:[/] none (no layout of {r['num_gpus']} GPUs fits)")
        return
    t = _table(con, f"Best feasible layouts ({r['feasible_layouts']} fit)", "#", "training layout", "rollout",
               "train GB", "host GB/node", "train s", "step s")
    for i, s in enumerate(r["search"], 1):
        t.add_row(str(i), s["layout"], s["rollout_layout"] or "none (rl=false)", _f(s["train_gb"]),
                  _f(s["host_gb_per_node"], nd=0), _f(s["train_s"]), _f(s["step_s"]))
    con.print(t)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=1)


def to_wandb(r: dict) -> str:
    return json.dumps(flat(r), indent=1)
