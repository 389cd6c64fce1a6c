"""The end-of-run table, the Herald/naive comparison and the JSON results file."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from bench.subscribers import TRANSPORTS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GOALS = {"deliveries_ratio": 1.5, "p99_ratio": 1.0, "idle_kib_per_ws": 12.0}
LOADGEN_SATURATED_PCT = 90
MACHINE_BUSY_PCT = 25
ROW = "{:<10} {:<13} {:>13} {:>9} {:>9} {:>15}   {}"
IDLE_ROW = "{:<10} {:>9}   {:<24} {}"


def ratio(targets: dict, part: str, key: str) -> float | None:
    herald = targets.get("herald", {}).get(part, {}).get(key)
    naive = targets.get("naive", {}).get(part, {}).get(key)
    return round(herald / naive, 3) if herald is not None and naive else None


def comparison(targets: dict) -> dict:
    """Herald/naive ratios per transport, and Herald's idle memory, next to the goals they are held to."""
    compared = {
        transport: {
            "deliveries_ratio": ratio(targets, transport, "deliveries_per_s"),
            "p99_ratio": ratio(targets, transport, "p99_ms"),
        }
        for transport in TRANSPORTS
    }
    compared["idle_kib_per_ws"] = targets.get("herald", {}).get("idle_ws", {}).get("kib_per_connection")
    return compared | {"goals": GOALS}


def part(parts: dict, key: str) -> dict:
    """One measurement of a target; a target that failed to start has only its error."""
    return parts.get(key, parts)


def verdict(value: float | None, goal: float, at_least: bool) -> str:
    if value is None:
        return "n/a"
    return "met" if (value >= goal if at_least else value <= goal) else "MISSED"


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def notes(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error'][:80]}"
    found = []
    if (result.get("loadgen_cpu_pct") or 0) >= LOADGEN_SATURATED_PCT:
        found.append("load generator saturated: the figure may be its limit")
    if (result.get("other_cpu_pct") or 0) >= MACHINE_BUSY_PCT:
        found.append(f"other load on the machine: {result['other_cpu_pct']}% of a core")
    if result.get("deliveries_missed"):
        found.append(f"burst incomplete: {result['deliveries_missed']} deliveries missed")
    if result.get("latency_missed"):
        found.append(f"{result['latency_missed']} steady-rate deliveries missed")
    return "; ".join(found)


def cpu(result: dict) -> str:
    if result.get("server_cpu_pct") is None:
        return "-"
    return f"{result['server_cpu_pct']}% / {result['loadgen_cpu_pct']}%"


def transport_rows(targets: dict, transport: str, compared: dict) -> list[str]:
    rows = []
    for name, parts in targets.items():
        result = part(parts, transport)
        deliveries = number(result.get("deliveries_per_s"), ",d")
        latencies = number(result.get("p50_ms"), ".2f"), number(result.get("p99_ms"), ".2f")
        rows.append(ROW.format(transport, name, deliveries, *latencies, cpu(result), notes(result)))
    if {"herald", "naive"} <= targets.keys():
        deliveries, p99 = compared[transport]["deliveries_ratio"], compared[transport]["p99_ratio"]
        goals = (
            f"goals: deliveries/s ≥ {GOALS['deliveries_ratio']:.1f}x "
            f"({verdict(deliveries, GOALS['deliveries_ratio'], True)}), "
            f"p99 ≤ {GOALS['p99_ratio']:.1f}x ({verdict(p99, GOALS['p99_ratio'], False)})"
        )
        ratios = number(deliveries, ".2f") + "x", "", number(p99, ".2f") + "x", ""
        rows.append(ROW.format(transport, "herald/naive", *ratios, goals))
    return rows


def idle_note(name: str, idle: dict) -> str:
    if name != "herald" or "error" in idle:
        return notes(idle)
    goal = GOALS["idle_kib_per_ws"]
    return f"goal ≤ {goal:g} KiB ({verdict(idle['kib_per_connection'], goal, False)})"


def idle_rows(targets: dict) -> list[str]:
    rows = []
    for name, parts in targets.items():
        idle = part(parts, "idle_ws")
        before, after = idle.get("rss_before_kib"), idle.get("rss_after_kib")
        span = f"{before / 1024:.1f} → {after / 1024:.1f}" if before is not None and after is not None else ""
        rows.append(IDLE_ROW.format(name, number(idle.get("kib_per_connection"), ".2f"), span, idle_note(name, idle)))
    return rows


def format_report(results: dict) -> str:
    config, targets = results["config"], results["targets"]
    compared = results["comparison"]
    lines = [
        "",
        f"Fan-out: {config['subscribers']} subscribers per transport on one channel; burst of {config['events']} "
        f"events, then {config['rate']} events/s for {config['duration']} s (latency: POST sent → event received)",
        "",
        ROW.format("transport", "target", "deliveries/s", "p50 ms", "p99 ms", "CPU srv / gen", "notes"),
    ]
    for transport in TRANSPORTS:
        lines += transport_rows(targets, transport, compared)
    if config["idle"] > 0:
        lines += [
            "",
            f"Server RSS per idle subscribed WebSocket, {config['idle']} connections:",
            IDLE_ROW.format("target", "KiB/conn", "RSS before → after, MiB", "notes"),
            *idle_rows(targets),
        ]
    return "\n".join(line.rstrip() for line in lines)


def write_json(results: dict, started: datetime) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"fanout-{started:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return path
