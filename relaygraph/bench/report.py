"""The bench's goals and its results as a table."""

from __future__ import annotations

import os
from typing import Any

GOALS = {"prefill_amplification": 1.05, "handoff_overhead_ms": 0.5, "relay_vs_solo": 1.1,
         "relay_vs_floor": 1.05, "throughput_vs_solo": 0.9}


def goals_met(out: dict[str, Any]) -> dict[str, bool]:
    """Each goal against what was measured (goals without a measurement are left out)."""
    met = {
        "prefill_amplification": all(v["reuse"]["ratio"] <= GOALS["prefill_amplification"]
                                     for v in out["prefill_amplification"].values()),
        "handoff_overhead_ms": out["handoff_overhead_ms"]["median"] < GOALS["handoff_overhead_ms"],
        "relay_vs_solo": out["relay_vs_solo"]["ratio"] <= GOALS["relay_vs_solo"],
    }
    if "relay_vs_floor" in out:
        met["relay_vs_floor"] = out["relay_vs_floor"]["ratio"] <= GOALS["relay_vs_floor"]
    if "throughput_vs_solo" in out:
        met["throughput_vs_solo"] = out["throughput_vs_solo"]["ratio"] >= GOALS["throughput_vs_solo"]
    return met


def machine() -> dict[str, Any]:
    """What the numbers were measured on (and how busy it was when the bench began)."""
    import platform

    info: dict[str, Any] = {"cpus": os.cpu_count(), "load_start": os.getloadavg()[0],
                            "platform": platform.platform(),
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # a bench of server backends needs no torch
        pass
    return info


def table(res: dict[str, Any]) -> str:
    """The results as a readable Markdown table."""
    ok = {True: "met", False: "NOT met"}
    rows = ["| measure | value | goal |", "|---|---|---|"]
    for name, v in res["prefill_amplification"].items():
        rows.append(f"| prefill amplification, {name} | {v['reuse']['ratio']:.3f} with reuse "
                    f"({v['reuse']['processed']}/{v['reuse']['view']} tokens); "
                    f"{v['naive']['ratio']:.2f} naive | <= {GOALS['prefill_amplification']} |")
    h = res["handoff_overhead_ms"]
    rows.append(f"| handoff overhead (median, models excluded) | {h['median']:.2f} ms "
                f"(p90 {h['p90']:.2f}; CPU {h['cpu_median']:.2f} ms); "
                f"{h['ratio_to_bare_step']:.1f}x a bare LangGraph step "
                f"({h['bare_langgraph_step_ms']:.3f} ms); LangGraph's share "
                f"{h['relay_step_ms']:.3f} ms | < {GOALS['handoff_overhead_ms']} ms |")
    for every, entry in res["relay_vs_solo"]["by_interval"].items():
        r = entry["relay_vs_solo"]
        rows.append(f"| relay / solo, interval {every} ({entry['handoffs']} handoffs) | "
                    f"{r['ratio']:.2f} (median {entry['relay_s']['median']:.1f} s vs "
                    f"{entry['solo_s']['median']:.1f} s; ratio of mins {r['ratio_of_mins']:.2f}) "
                    f"| <= {GOALS['relay_vs_solo']} |")
        if "relay_vs_floor" in entry:
            f = entry["relay_vs_floor"]
            rows.append(f"| relay / floor, interval {every} | {f['ratio']:.2f} (floor "
                        f"{entry['floor_s']['min']:.1f} s = solo + "
                        f"{entry['catch_up_s']['min']:.2f} s that the catch-up prefills add) "
                        f"| <= {GOALS['relay_vs_floor']} |")
    rows.append(f"| naive relay / solo | {res['relay_vs_solo']['naive_ratio']:.2f} | |")
    for t in res["throughput"]:
        rows.append(f"| throughput, {t['concurrency']} concurrent | {t['tokens_per_s']:.1f} tok/s "
                    f"vs solo {t['solo_tokens_per_s']:.1f}: {t['vs_solo']['ratio']:.2f} "
                    f"| >= {GOALS['throughput_vs_solo']} at the most |")
    met = ", ".join(f"{k}: {ok[v]}" for k, v in res["goals_met"].items())
    m = res["machine"]
    note = (f"\n\n{res['handoffs']} handoffs at interval {res['interval']}; {res['repeat']} "
            f"interleaved rounds per ratio (median of the per-round ratios); load average "
            f"{m['load_start']:.1f} "
            f"-> {m.get('load_end', m['load_start']):.1f} on {m['cpus']} CPUs; goals: {met}")
    warned = "".join(f"\nwarning: {w}" for w in res.get("warnings", ()))
    return "\n".join(rows) + note + warned
