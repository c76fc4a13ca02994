"""One figure per case, drawn from the results `run` writes (``{run label: result}``), saved as PNG."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["draw"]

Results = dict[str, dict[str, Any]]


def _bars(ax: Any, labels: list[str], values: list[float], title: str, fmt: str = "{:g}",
          colors: list[str] | None = None) -> None:
    bars = ax.bar(labels, values, color=colors or ["#888888", "#d62728", "#1f77b4", "#2ca02c"][:len(labels)])
    ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
    ax.set_title(title, fontsize=10)


def _poison(results: Results, fig: Any) -> None:
    r = results["poison"]
    runs = {"clean": r["clean"], **{f"{k} fault": v for k, v in r["faults"].items()}}
    axes = fig.subplots(1, 3)
    _bars(axes[0], list(runs), [v["model_calls"] for v in runs.values()], "model calls")
    _bars(axes[1], list(runs), [v["collate_calls"] for v in runs.values()], "collations (batch runs tried)")
    _bars(axes[2], list(runs), [v["wall_s"] for v in runs.values()], "wall time (s)", "{:.2f}")
    lines = [f"{k}: good ok {v['good_ok']}/{v['requests'] - v['bad']}, bad with own RequestFailed "
             f"{v['bad_own_typed_error']}/{v['bad']}, x{v['time_vs_clean']} time" for k, v in r["faults"].items()]
    fig.supxlabel("\n".join(lines), fontsize=8)


def _oom(results: Results, fig: Any) -> None:
    r = results["oom"]
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    colors = {"ok": "#2ca02c", "oom": "#d62728", "poison": "#9467bd"}
    calls = r["calls"]
    for outcome, color in colors.items():
        xs = [i for i, c in enumerate(calls) if c["outcome"] == outcome]
        ax.scatter(xs, [calls[i]["size"] for i in xs], s=10, color=color, label=outcome)
    ax.axhline(r["params"]["limit"], color="black", ls="--", lw=1, label=f"true limit {r['params']['limit']}")
    ax.set_xlabel("model call")
    ax.set_ylabel("batch size")
    ax.set_yscale("log", base=2)
    ax.legend(fontsize=8)
    ax.set_title(f"every call, {len(r['waves'])} waves of {r['params']['requests']} requests "
                 f"(remembered limit: {r['waves'][-1]['max_batch_size_now']})", fontsize=10)
    waves = [w["wall_s"] for w in r["waves"]]
    known = [w["wall_s"] for w in r["reference_known_limit"]]
    xs = range(len(waves))
    bx.plot(xs, waves, "o-", label="learning the limit")
    bx.plot(xs, known, "s--", label="limit known")
    bx.set_xlabel("wave")
    bx.set_ylabel("wall time (s)")
    bx.legend(fontsize=8)


def _binned(timeline: list[tuple[float, float, str]], width: float) -> dict[str, dict[int, int]]:
    bins: dict[str, Counter] = {}
    for t, _, kind in timeline:
        bins.setdefault(kind, Counter())[int(t // width)] += 1
    return bins


def _overload(results: Results, fig: Any) -> None:
    r = results["overload"]
    p = r["params"]
    axes = fig.subplots(4, 1, sharex=False, gridspec_kw={"height_ratios": [2, 2, 2, 1.4]})
    edges = [0, p["phases_s"][0], p["phases_s"][0] + p["phases_s"][1], sum(p["phases_s"])]
    for ax in axes[:3]:
        for edge in edges[1:3]:
            ax.axvline(edge, color="grey", lw=0.8, ls=":")
    lat = r["latency_timeline"]
    for kind, color in (("ok", "#2ca02c"), ("timeout", "#d62728")):
        points = [(t, ms) for t, ms, k in lat if k == kind]
        axes[0].scatter([t for t, _ in points], [ms for _, ms in points], s=3, color=color, label=kind)
    axes[0].axhline(p["timeout_s"] * 1000, color="black", ls="--", lw=0.8, label="timeout")
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title(f"capacity {p['capacity_per_s']:.0f}/s, {p['load_factor']:g}x for {p['phases_s'][1]:g} s; "
                      f"refusals p99 {r['rejection_ms']['p99']} ms", fontsize=10)
    queue = r["queue_timeline"]
    axes[1].plot([t for t, _, _ in queue], [d for _, d, _ in queue], label="queue depth")
    axes[1].plot([t for t, _, _ in queue], [n for _, _, n in queue], label="accepted payloads alive")
    axes[1].axhline(p["max_queue"], color="black", ls="--", lw=0.8, label="max_queue")
    axes[1].set_ylabel("requests")
    axes[1].legend(fontsize=7, loc="upper right")
    rss = r["rss_timeline"]
    axes[2].plot([t for t, _ in rss], [mb for _, mb in rss], color="#9467bd")
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].set_xlabel("time (s)")
    rows = results["rejection_cost"]["rows"]
    _bars(axes[3], [f"max_queue={row['max_queue']}" for row in rows], [row["us"]["p50"] for row in rows],
          "one refused submit with a full queue, p50 (us)", "{:.0f}", ["#1f77b4"] * len(rows))


def _cancel(results: Results, fig: Any) -> None:
    r = results["storm"]
    ax, bx = fig.subplots(1, 2)
    moments = r["cancelled_at"]
    ax.barh(list(moments), list(moments.values()), color="#1f77b4")
    ax.set_title(f"where {sum(moments.values())} async callers were when they cancelled", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    counts = r["outcomes"]["counts"]
    t = r["threaded"]
    labels = ["ok", "cancelled", "wrong", "hung", "other"]
    async_values = [counts["ok"], counts["cancelled"], counts["wrong"], r["hung"],
                    sum(v for k, v in counts.items() if k not in ("ok", "cancelled", "wrong"))]
    thread_values = [t["ok"], t["cancelled"], t["wrong"], t["hung"], t["error"]]
    xs = range(len(labels))
    bx.bar([x - 0.2 for x in xs], async_values, 0.4, label="async callers")
    bx.bar([x + 0.2 for x in xs], thread_values, 0.4, label="threaded callers")
    bx.set_xticks(list(xs), labels)
    bx.legend(fontsize=8)
    bx.set_title("outcomes (wrong, hung, other must be 0)", fontsize=10)


def _shutdown(results: Results, fig: Any) -> None:
    ax = fig.subplots(1, 1)
    labels, ok, closed, refused, close_s = [], [], [], [], []
    for label, r in results.items():
        labels.append(label)
        if "answered" in r:
            ok.append(r["outcomes"]["counts"]["ok"])
            closed.append(r["closed_while_queued"])
            refused.append(r["refused_after_close"])
        else:
            ok.append(r["outcomes"]["ok"])
            closed.append(r["outcomes"]["closed_while_queued"])
            refused.append(sum(r["refusals"].values()))
        close_s.append(r["close_s"])
    xs = range(len(labels))
    ax.bar([x - 0.27 for x in xs], ok, 0.27, label="answered with a result")
    ax.bar(list(xs), closed, 0.27, label="SchedulerClosed while queued")
    ax.bar([x + 0.27 for x in xs], refused, 0.27, label="refused after close")
    ax.set_xticks(list(xs), [f"{label}\nclose took {s:.2f} s" for label, s in zip(labels, close_s)], fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("closing under load: every accepted request answered once, nothing left running", fontsize=10)


def _bad_input(results: Results, fig: Any) -> None:
    ax = fig.subplots(1, 1)
    sections = [s for s in results["table"]["sections"] if "skipped" not in s]
    kinds = ["refused at submit (typed)", "refused at submit (untyped)", "failed in its batch", "accepted"]
    colors = ["#2ca02c", "#d62728", "#ff7f0e", "#1f77b4"]
    left = [0] * len(sections)
    for kind, color in zip(kinds, colors):
        values = []
        for s in sections:
            values.append(sum(1 for row in s["rows"] if _bad_kind(row) == kind))
        ax.barh([s["adapter"] for s in sections], values, left=left, color=color, label=kind)
        left = [a + b for a, b in zip(left, values)]
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("malformed inputs")
    ax.set_title("what each adapter did with malformed input (docs/bad-input.md has every row)", fontsize=10)


def _bad_kind(row: dict[str, str]) -> str:
    if row["outcome"] == "refused at submit":
        typed = row["error"] in ("InvalidRequestError", "RequestTooLargeError")
        return "refused at submit (typed)" if typed else "refused at submit (untyped)"
    return row["outcome"]


def _soak(results: Results, fig: Any) -> None:
    r = results["soak"]
    ax, bx = fig.subplots(2, 1)
    rss = r["rss_timeline"]
    ax.plot([t for t, _ in rss], [mb for _, mb in rss], color="#9467bd")
    ax.set_ylabel("RSS (MiB)")
    offered = ", ".join(f"{name} {rate:g}/s ({r['offered_fraction'][name]:.0%} of {r['capacity_per_s'][name]:g})"
                        for name, rate in r["offered_per_s"].items())
    ax.set_title(f"offered for {r['params']['seconds']:g} s: {offered}", fontsize=10)
    starts = [w["from_s"] for w in r["windows"]]
    for name in r["accounting"]:
        bx.plot(starts, [w[name]["p50"] for w in r["windows"]], "o-", label=f"{name} p50")
        bx.plot(starts, [w[name]["p99"] for w in r["windows"]], "s--", label=f"{name} p99")
    bx.set_xlabel("window start (s)")
    bx.set_ylabel("latency (ms)")
    bx.legend(fontsize=8)


_DRAW = {"poison": (_poison, (11, 4.2)), "oom": (_oom, (11, 4)), "overload": (_overload, (10, 11)),
         "cancel": (_cancel, (11, 4)), "shutdown": (_shutdown, (10, 4.5)), "bad-input": (_bad_input, (9, 3.5)),
         "soak": (_soak, (9, 6))}


def draw(case: str, title: str, results: Results, path: Path, subtitle: str) -> None:
    """Draw case ``case``'s figure from its results and save it at ``path``."""
    function, size = _DRAW[case]
    fig = plt.figure(figsize=size, layout="constrained")
    function(results, fig)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
