"""Device prices: what an hour of the device a run used costs, and where that figure comes from."""

from __future__ import annotations


# Prices per device-hour, stated wherever they are used: approximate 2024 public-cloud on-demand
# prices (the per-GPU share of the hyperscalers' 8-GPU instances). Check your provider's: pass
# --price-per-hour NUMBER. A run is priced as the device it ran on (the run sidecar's device and
# gpu_name); a CPU run has no default price (it is not priced as a GPU unless asked: pass a device
# name or your machine's price).
PRICE_CURRENCY = "USD"
DEVICE_PRICES = {
    "A100": (5.00, "about the per-GPU share of an 8 x A100-80GB on-demand instance in 2024 (AWS p4de.24xlarge "
                   "about USD 41/h, GCP a2-ultragpu-8g about USD 40/h)"),
    "H100": (12.00, "about the per-GPU share of an 8 x H100-80GB on-demand instance in 2024 (AWS p5.48xlarge "
                    "about USD 98/h)"),
}
# Dense bf16 peak TFLOP/s of each priced device (vendor data sheets), for `--plan`'s estimate of how
# long a corpus takes on a device the plan cannot measure (it assumes a stated share of this peak).
DEVICE_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}
DEFAULT_GPU = "A100"  # kept for callers; pricing follows the run's device
DEFAULT_PRICE_PER_GPU_HOUR = DEVICE_PRICES[DEFAULT_GPU][0]
DEFAULT_PRICE_SOURCE = DEVICE_PRICES[DEFAULT_GPU][1]


def resolve_price(spec, throughput: dict, device_name: str | None = None) -> dict:
    """The hourly price to use: `spec` is None (the run's own device from its sidecar), a number
    (this price for the run's device) or a device name of DEVICE_PRICES (price the run as that
    device, e.g. a CPU run as an A100). Returns price (None when there is none), device, source."""
    run_device = device_name or throughput.get("gpu_name") or (
        "CPU machine" if throughput.get("device") == "cpu" else throughput.get("device")) or "unknown device"
    if spec is not None and not isinstance(spec, str):
        return {"price": float(spec), "device": run_device, "source": "given on the command line"}
    if isinstance(spec, str):
        try:
            return {"price": float(spec), "device": run_device, "source": "given on the command line"}
        except ValueError:
            pass
        name = _price_key(spec)
        if name is None:
            raise ValueError(f"no price for device {spec!r}: pass a number, or one of {', '.join(DEVICE_PRICES)}")
        return {"price": DEVICE_PRICES[name][0], "device": name, "source": DEVICE_PRICES[name][1] + ", asked for"}
    if throughput.get("device") == "cuda":
        name = _price_key(str(throughput.get("gpu_name") or ""))
        if name is not None:
            return {"price": DEVICE_PRICES[name][0], "device": run_device, "source": DEVICE_PRICES[name][1]}
        return {"price": None, "device": run_device,
                "source": f"no price known for {run_device}: pass --price-per-hour NUMBER"}
    return {"price": None, "device": run_device,
            "source": "a CPU run has no default price: pass --price-per-hour NUMBER (your machine's hourly "
                      f"price) or a device name ({', '.join(DEVICE_PRICES)}) to price it as that device"}


def _price_key(name: str) -> str | None:
    """The DEVICE_PRICES key a device name such as 'NVIDIA A100-SXM4-80GB' belongs to."""
    hits = [k for k in DEVICE_PRICES if k.lower() in name.lower()]
    return hits[0] if len(hits) == 1 else None

