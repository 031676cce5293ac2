"""Peak resident memory of the current process (Linux): what the benchmarks' fresh subprocesses report."""


def proc_status() -> dict:
    """{"VmHWM": peak RSS, "VmRSS": current RSS} in bytes, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024  # kB -> B
    return out


def reset_peak():
    """Set the kernel's peak-RSS mark VmHWM to the current RSS (Linux >= 4.0: clear_refs value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
