"""The promises each case checks, as data: the tests assert them, the long runs record them next to the numbers.

Each ``check_*`` takes a case's result and returns a list of `Promise` (what is promised, whether it held, and
the numbers behind it). Bounds that depend on the machine are arguments with generous defaults: the tests run on
a shared 2-core CPU, where timing noise is large.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Promise", "failed", "as_records", "assert_kept", "check_probe", "check_poison", "check_oom", "check_overload",
           "check_rejection_cost", "check_cancel", "check_shutdown", "check_shutdown_threaded", "check_soak",
           "check_bad_input_good_requests", "check_bad_input_typed"]


@dataclass(frozen=True)
class Promise:
    promise: str
    ok: bool
    detail: str = ""


def failed(promises: list[Promise]) -> list[Promise]:
    return [p for p in promises if not p.ok]


def as_records(promises: list[Promise]) -> list[dict[str, Any]]:
    return [asdict(p) for p in promises]


#: advice batchplex logs once per process about its configuration, not about a request: whichever case first adds a
#: CUDA workload while torch's intra-op pool is wide logs it (`batchplex._host_threads`)
CONFIGURATION_ADVICE = ("batchplex WARNING: torch runs host-side tensor work on ",)


def check_probe(result: dict[str, Any], allowed_logs: tuple[str, ...] = ()) -> list[Promise]:
    """What every case promises: asyncio saw no error, no future was resolved twice, nothing is left running,
    and nothing was logged (except ``allowed_logs`` substrings and `CONFIGURATION_ADVICE`)."""
    probe = result["probe"]
    allowed_logs = (*allowed_logs, *CONFIGURATION_ADVICE)
    logs = [line for line in probe["log_records"] if not any(allowed in line for allowed in allowed_logs)]
    return [
        Promise("asyncio's exception handler saw nothing (no InvalidStateError, no unretrieved exception)",
                not probe["loop_errors"], "; ".join(probe["loop_errors"][:3])),
        Promise("no caller's future was resolved twice", probe["second_resolutions"] == 0,
                f"second resolutions: {probe['second_resolutions']}"),
        Promise("no task is left pending", not probe["leftover_tasks"], "; ".join(probe["leftover_tasks"][:3])),
        Promise("no batchplex- thread is left", not probe["leftover_threads"], ", ".join(probe["leftover_threads"])),
        Promise("nothing unexpected was logged at WARNING or above", not logs, "; ".join(logs[:3])),
    ]


def check_poison(result: dict[str, Any]) -> list[Promise]:
    out = []
    bound = 2 * math.ceil(math.log2(result["params"]["max_batch_size"]))
    clean = result["clean"]
    out.append(Promise("the clean run serves every request", clean["good_ok"] == clean["requests"],
                       f"{clean['good_ok']} of {clean['requests']}"))
    for fault, run in result["faults"].items():
        good = run["requests"] - run["bad"]
        out += [
            Promise(f"{fault} fault: every good request gets its own result", run["good_ok"] == good
                    and run["good_not_ok"] == 0, f"{run['good_ok']} of {good} ok, {run['good_not_ok']} not"),
            Promise(f"{fault} fault: every bad request gets its own RequestFailed naming it, cause chained",
                    run["bad_own_typed_error"] == run["bad"] and run["bad_other"] == 0,
                    f"{run['bad_own_typed_error']} of {run['bad']}; example: {run['bad_error_example']}"),
            Promise(f"{fault} fault: statistics() counts both", run["completed"] == good
                    and run["failed"] == run["bad"], f"completed {run['completed']}, failed {run['failed']}"),
            Promise(f"{fault} fault: bisection costs at most 2*log2(max_batch_size) = {bound} extra batch runs "
                    f"per bad request", run["extra_calls_per_bad_request"] <= bound,
                    f"{run['extra_calls_per_bad_request']} extra collations per bad request"),
        ]
    return out


def check_oom(result: dict[str, Any]) -> list[Promise]:
    limit = result["params"]["limit"]
    waves = result["waves"]
    out = [Promise(f"wave {w['wave']}: every request is served", w["not_served"] == 0,
                   f"{w['served']} served, {w['not_served']} not") for w in waves]
    out.append(Promise(f"the scheduler remembers a batch limit <= {limit} after the first out-of-memory",
                       1 <= waves[0]["max_batch_size_now"] <= limit,
                       f"max_batch_size_now = {waves[0]['max_batch_size_now']}"))
    for before, wave in zip(waves, waves[1:]):
        out.append(Promise(f"wave {wave['wave']}: no batch above the remembered limit, no out-of-memory",
                           wave["oom_calls"] == 0 and wave["largest_tried_batch"] <= before["max_batch_size_now"],
                           f"{wave['oom_calls']} OOM calls, largest batch {wave['largest_tried_batch']}"))
    out.append(Promise("the reference run (limit known in advance) serves every request",
                       all(w["not_served"] == 0 for w in result["reference_known_limit"])))
    return out


def check_overload(result: dict[str, Any], *, rss_bound_mb: float = 64.0, slack_s: float = 0.25,
                   recovery_factor: float = 1.5, recovery_slack_ms: float = 20.0) -> list[Promise]:
    p = result["params"]
    counts = result["outcomes"]["counts"]
    stats = result["statistics"]
    base = result["phases"]["baseline"]["latency_ms_second_half"]
    rec = result["phases"]["recovery"]["latency_ms_second_half"]
    run_bound_ms = 2 * p["batch_ms"] + slack_s * 1000
    live_bound = p["max_queue"] + 2 * p["max_batch_size"] + 32
    return [
        Promise(f"the queue never holds more than max_queue={p['max_queue']}", result["max_queue_depth"] <= p["max_queue"],
                f"max depth seen {result['max_queue_depth']}"),
        Promise("refused submits fail at once with QueueFullError (p99 < 5 ms)", counts["full"] > 0
                and result["rejection_ms"]["p99"] < 5.0, f"{counts['full']} refusals, {result['rejection_ms']}"),
        Promise(f"peak RSS stays within {rss_bound_mb} MiB of the start",
                result["peak_rss_mb"] - result["rss_before_mb"] <= rss_bound_mb,
                f"{result['rss_before_mb']} -> {result['peak_rss_mb']} MiB"),
        Promise(f"accepted requests alive stay bounded (<= {live_bound})", result["max_live_payloads"] <= live_bound,
                f"max alive {result['max_live_payloads']}"),
        Promise(f"an accepted request runs in time: done within its timeout + {run_bound_ms:.0f} ms",
                (result["ok_past_timeout_ms"]["max"] or 0.0) <= run_bound_ms, f"{result['ok_past_timeout_ms']}"),
        Promise("or it fails with DeadlineExceeded, not early and not late", result["timeouts_early"] == 0
                and (result["timeout_overshoot_ms"]["max"] or 0.0) <= slack_s * 1000,
                f"{counts['timeout']} timeouts, {result['timeouts_early']} early, overshoot {result['timeout_overshoot_ms']}"),
        Promise("no caller gets a wrong result, an untyped error, or waits forever",
                counts["wrong"] == 0 and counts["untyped"] == 0 and counts["failed"] == 0 and result["hung"] == 0,
                f"{counts}, hung {result['hung']}"),
        Promise("statistics() agrees with the callers", stats["submitted"] == counts["ok"] + counts["timeout"]
                and stats["rejected_full"] == counts["full"] and stats["timeouts"] == counts["timeout"], f"{stats}"),
        Promise("after the overload, latency is back to the baseline",
                rec["p50"] is not None and base["p50"] is not None
                and rec["p50"] <= max(recovery_factor * base["p50"], base["p50"] + recovery_slack_ms),
                f"baseline p50 {base['p50']} ms, recovery p50 {rec['p50']} ms"),
        Promise("after the overload, no request is refused any more",
                result["phases"]["recovery"]["rejected_second_half"] == 0,
                f"{result['phases']['recovery']['rejected_second_half']} refused in the second half of recovery"),
    ]


def check_rejection_cost(result: dict[str, Any], factor: float = 4.0, slack_us: float = 20.0) -> list[Promise]:
    rows = result["rows"]
    small, large = rows[0], rows[-1]
    return [Promise(f"a refused submit costs about the same at max_queue={large['max_queue']} as at "
                    f"max_queue={small['max_queue']} (p50 within {factor}x + {slack_us} us)",
                    large["us"]["p50"] <= factor * small["us"]["p50"] + slack_us,
                    ", ".join(f"max_queue={r['max_queue']}: p50 {r['us']['p50']} us, p99 {r['us']['p99']} us"
                              for r in rows))]


def check_cancel(result: dict[str, Any]) -> list[Promise]:
    counts = result["outcomes"]["counts"]
    threaded = result["threaded"]
    stats = result["statistics"]
    moments = result["cancelled_at"]
    dropped = moments.get("queued (dropped, never ran)", 0)
    others = {k: counts[k] for k in counts if k not in ("ok", "cancelled") and counts[k]}
    return [
        Promise("no result goes to the wrong caller", counts["wrong"] == 0 and threaded["wrong"] == 0,
                f"async wrong {counts['wrong']}, threaded wrong {threaded['wrong']}"),
        Promise("every caller ends with its result or its own cancellation", not others and threaded["error"] == 0,
                f"other outcomes {others}, threaded errors {threaded['error']}"),
        Promise("nothing hangs", result["hung"] == 0 and threaded["hung"] == 0,
                f"async hung {result['hung']}, threaded hung {threaded['hung']}"),
        Promise("callers cancelled while queued, while collating and while running",
                dropped > 0 and moments.get("while running", 0) > 0, f"{moments}"),
        Promise("a caller that cancelled while queued never runs (statistics count exactly those)",
                stats["cancelled"] == dropped + threaded["dropped_never_ran"],
                f"statistics cancelled {stats['cancelled']}, never collated {dropped} + "
                f"{threaded['dropped_never_ran']}"),
        Promise("statistics() accounts for every accepted request", stats["submitted"] == stats["completed"]
                + stats["failed"] + stats["timeouts"] + stats["cancelled"], f"{stats}"),
    ]


def check_shutdown(result: dict[str, Any]) -> list[Promise]:
    counts = result["outcomes"]["counts"]
    drain = result["params"]["drain"]
    out = [
        Promise("requests were queued and running when the scheduler closed",
                result["queued_at_close"] > 0 and result["in_flight_at_close"] > 0,
                f"queued {result['queued_at_close']}, in flight {result['in_flight_at_close']}"),
        Promise("every accepted request is answered exactly once, by the time close returns",
                result["answered"] == result["accepted"] and result["unanswered_after_close"] == 0
                and result["hung"] == 0, f"accepted {result['accepted']}, answered {result['answered']}, "
                f"unanswered after close {result['unanswered_after_close']}, hung {result['hung']}"),
        Promise("submits after close are refused with SchedulerClosed", result["refused_after_close"] > 0
                and counts["untyped"] == 0 and counts["wrong"] == 0, f"{counts}"),
        Promise("no batchplex- thread is left once close returns", not result["threads_after_close"],
                ", ".join(result["threads_after_close"])),
    ]
    if drain:
        out.append(Promise("drain: every accepted request gets its result", counts["ok"] == result["accepted"]
                           and result["closed_while_queued"] == 0, f"ok {counts['ok']} of {result['accepted']}"))
    else:
        out.append(Promise("no drain: queued requests get SchedulerClosed, running ones their results",
                           result["closed_while_queued"] > 0
                           and counts["ok"] + result["closed_while_queued"] == result["accepted"],
                           f"ok {counts['ok']}, closed while queued {result['closed_while_queued']}, accepted "
                           f"{result['accepted']}"))
    return out


def check_shutdown_threaded(result: dict[str, Any]) -> list[Promise]:
    o = result["outcomes"]
    untyped = {k: v for k, v in result["refusals"].items() if k != "closed"}
    out = [
        Promise("threaded callers: every accepted request ends in its result or SchedulerClosed",
                o["other"] == 0 and o["hung"] == 0 and o["wrong"] == 0, f"{o}"),
        Promise("threaded callers: submits during and after close are refused with SchedulerClosed only",
                not untyped, f"{result['refusals']}"),
        Promise("threaded callers: no batchplex- thread is left, every submitter stopped",
                not result["threads_after_close"] and result["submitters_alive"] == 0,
                f"{result['threads_after_close']}, submitters alive {result['submitters_alive']}"),
    ]
    if result["params"]["drain"]:
        out.append(Promise("threaded callers, drain: every accepted request gets its result",
                           o["ok"] == result["accepted"], f"{o}"))
    return out


def check_soak(result: dict[str, Any], *, rss_growth_mb: float = 32.0, p50_factor: float = 2.0,
               p50_slack_ms: float = 10.0, p99_factor: float = 2.0, p99_slack_ms: float = 50.0) -> list[Promise]:
    out = [Promise("nothing hangs", result["hung"] == 0, f"hung {result['hung']}")]
    for name, acc in result["accounting"].items():
        c, s = acc["callers"], acc["scheduler"]
        out += [
            Promise(f"{name}: no wrong result, no untyped error", c["wrong"] == 0 and c["untyped"] == 0, f"{c}"),
            Promise(f"{name}: every request accounted for: attempts == completed + failed + timeouts + cancelled "
                    f"+ rejections", acc["attempts"] == c["ok"] + c["failed"] + c["timeout"] + c["cancelled"]
                    + c["full"] + c["invalid"] and s["submitted"] == c["ok"] + c["failed"] + c["timeout"]
                    + c["cancelled"] and s["submitted"] == s["completed"] + s["failed"] + s["timeouts"]
                    + s["cancelled"] and s["rejected_invalid"] == c["invalid"] and s["rejected_full"] == c["full"],
                    f"callers {c}; scheduler {s}"),
        ]
    first, last = result["windows"][0], result["windows"][-1]
    out.append(Promise(f"memory does not grow: last window within {rss_growth_mb} MiB of the first",
                       last["rss_mb"] - first["rss_mb"] <= rss_growth_mb,
                       f"{first['rss_mb']} -> {last['rss_mb']} MiB"))
    for name in result["accounting"]:
        a, b = first[name], last[name]
        served = all(w[name]["p50"] is not None for w in result["windows"])
        out.append(Promise(f"{name}: latency does not grow (last window vs first: p50 <= {p50_factor}x + "
                           f"{p50_slack_ms} ms, p99 <= {p99_factor}x + {p99_slack_ms} ms; every window served)",
                           served and b["p50"] <= p50_factor * a["p50"] + p50_slack_ms
                           and b["p99"] <= p99_factor * a["p99"] + p99_slack_ms,
                           f"p50 {a['p50']} -> {b['p50']} ms, p99 {a['p99']} -> {b['p99']} ms"
                           + ("" if served else "; a window had no request served")))
    return out


def check_bad_input_good_requests(result: dict[str, Any]) -> list[Promise]:
    return [Promise(f"{s['adapter']}: the good requests next to the bad ones succeed",
                    s["good_ok"] == s["good_total"], "; ".join(s["good_errors"]))
            for s in result["sections"] if "skipped" not in s]


def check_bad_input_typed(section: dict[str, Any]) -> Promise:
    """Bad input refused at submit gets a typed `InvalidRequestError` (or its subclass), never a raw exception."""
    untyped = [f"{row['input']}: {row['error']}" for row in section["rows"] if row["outcome"] == "refused at submit"
               and row["error"] not in ("InvalidRequestError", "RequestTooLargeError")]
    return Promise(f"{section['adapter']}: every refusal at submit is an InvalidRequestError", not untyped,
                   "; ".join(untyped))


def assert_kept(promises: list[Promise]) -> None:
    """Fail (for pytest) with every broken promise and its numbers."""
    broken = failed(promises)
    assert not broken, "broken promises:\n" + "\n".join(f"- {p.promise}: {p.detail}" for p in broken)
