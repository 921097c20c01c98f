"""Money: device-hours and cost of a run as it was, of the same run at full depth, and the difference."""

from __future__ import annotations

from adainfer_ray.report.prices import PRICE_CURRENCY, resolve_price
from adainfer_ray.stats import ratio

def estimate_cost(summary: dict, price_per_gpu_hour=None, gpu: str | None = None,
                  full_depth_run: dict | None = None) -> dict:
    """Device-hours and cost of the run as it was, of the same run at full depth with the same
    prefix handling (early exit's real saving), and the difference; prefix reuse's saving apart.

    `price_per_gpu_hour`: None (the run's own device, see `resolve_price`), a number or a device
    name. Full depth is measured when `full_depth_run` (the summary of a `--policy full` run over
    the same corpus, with a sidecar) is given, and estimated from the model's compute time
    otherwise. Every figure comes with the assumption it rests on, in `assumptions`.
    """
    throughput = summary["throughput"]
    cost = {"price_per_gpu_hour": None, "currency": PRICE_CURRENCY, "gpu": gpu,
            "price_source": None, "cost_basis": throughput["cost_basis"], "unavailable_reason": None,
            "run_gpu_hours": None, "run_cost": None, "full_depth_source": None,
            "full_depth_gpu_hours": None, "full_depth_cost": None, "saved_gpu_hours": None,
            "saved_cost": None, "saved_share": None, "saved_cost_by_exit": None,
            "saved_cost_by_prefix": None, "saved_gpu_hours_by_prefix": None, "assumptions": []}
    if not throughput["available"]:
        cost["unavailable_reason"] = throughput["unavailable_reason"]
        return cost
    price = resolve_price(price_per_gpu_hour, throughput, gpu)
    cost.update(price_per_gpu_hour=price["price"], gpu=price["device"], price_source=price["source"])
    assumptions = [f"Price: {PRICE_CURRENCY} {price['price']:.2f} per hour of {price['device']} ({price['source']})."
                   if price["price"] is not None else f"No price: {price['source']}; hours only."]
    if throughput["cost_basis"] == "measured_gpu_time":
        assumptions.append("Run GPU-hours = wall time x GPUs the job held (from the run sidecar), "
                           "start-up and I/O included.")
    else:
        assumptions.append("Run hours = wall time of the CPU machine (from the run sidecar), start-up and I/O "
                           "included.")
    run_hours = throughput["gpu_seconds"] / 3600
    full_hours, cost["full_depth_source"], note = _full_depth_gpu_hours(summary, full_depth_run)
    cost["run_gpu_hours"] = run_hours
    if full_hours is None:
        cost["unavailable_reason"] = note
    else:
        assumptions.append(note)
        cost["full_depth_gpu_hours"] = full_hours
        cost["saved_gpu_hours"] = full_hours - run_hours
        cost["saved_share"] = ratio(cost["saved_gpu_hours"], full_hours)
    if cost["full_depth_source"] == "compute_time_x_flops":
        # Prefix reuse's own saving, on the same compute-time basis: not part of early exit's.
        cost["saved_gpu_hours_by_prefix"] = (throughput["engine_device_seconds"] / 3600
                                             * summary["prefix_saved_share"] * summary["flops_full"]
                                             / summary["flops_used"])
    if price["price"] is not None:
        p = price["price"]
        money = {"run_gpu_hours": "run_cost", "full_depth_gpu_hours": "full_depth_cost",
                 "saved_gpu_hours": "saved_cost", "saved_gpu_hours_by_prefix": "saved_cost_by_prefix"}
        for hours, key in money.items():
            cost[key] = None if cost[hours] is None else cost[hours] * p
        cost["saved_cost_by_exit"] = cost["saved_cost"]  # full depth has the run's own prefix handling
    cost["assumptions"] = assumptions
    return cost


def _full_depth_gpu_hours(summary: dict,
                          full_depth_run: dict | None) -> tuple[float | None, str | None, str]:
    """Device-hours of the same run at full depth with the same prefix handling, where the figure
    comes from, and the assumption it rests on (or, when it is None, why it is missing)."""
    if full_depth_run is not None and full_depth_run["throughput"]["available"] \
            and full_depth_run["rows"] and summary["rows"]:
        gpu_seconds_per_row = full_depth_run["throughput"]["gpu_seconds"] / full_depth_run["rows"]
        return (summary["rows"] * gpu_seconds_per_row / 3600, "measured_full_depth_run",
                "Full depth is measured: the --policy full run's device-seconds per row "
                f"({gpu_seconds_per_row:.4g}) times this run's {summary['rows']} rows; this "
                "assumes both runs saw the same kind of text on comparable hardware with the same prefix handling.")
    if not summary["flops_used"]:
        return None, None, "no rows with FLOP figures: full depth cannot be estimated"
    engine = summary["throughput"].get("engine_device_seconds")
    if engine is None:
        return None, None, ("the run sidecar records no model compute time (engine_s), and whole wall time "
                            "(start-up, I/O) does not scale with depth: pass --compare with a --policy full run "
                            "to measure full depth")
    ratio = (summary["flops_full"] * (1 - summary["prefix_saved_share"])) / summary["flops_used"]
    extra = engine * (ratio - 1)
    return ((summary["throughput"]["gpu_seconds"] + extra) / 3600, "compute_time_x_flops",
            f"Full depth is estimated: the run's hours plus its model compute time ({engine:,.1f} device-s, the "
            f"sidecar's engine_s) x (FLOPs at full depth with the same prefix handling / FLOPs used - 1) = "
            f"+{extra:,.1f} s; start-up and I/O are taken as unchanged. A --policy full run passed with "
            "--compare measures it instead.")

