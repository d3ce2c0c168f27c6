"""Helpers for tests that start Python subprocesses (simulated devices, several processes)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(device_count=None):
    """The parent's XLA_FLAGS (e.g. `--xla_cpu_max_isa=AVX` under `make test-isa`) without any device
    count, plus `device_count` simulated devices if given."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if device_count is not None:
        flags.append(f"--xla_force_host_platform_device_count={device_count}")
    return " ".join(flags)
