"""The markdown page of a benchmarks/gpu_check.py report (the JSON holds everything; this is what to read)."""

from __future__ import annotations

__all__ = ["markdown"]


def _f(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _machine(env: dict) -> list[str]:
    gpu, cpu = env["gpu"], env["cpu"]
    return [f"GPU: {gpu['name']} (cc {gpu['compute_capability']}, {gpu['memory_gib']} GiB, {gpu['count']} "
            f"device(s)); torch {gpu['torch']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}",
            f"CPU: {cpu['model']}, {cpu['cores']} cores, ISA {' '.join(cpu['isa']) or 'none of interest'}; "
            f"load average {env['load_average']}; python {env['python']}; started {env['started']}"]


def _status(sections: dict) -> list[str]:
    lines = ["| section | status | note |", "|---|---|---|"]
    for name, s in sections.items():
        note = s.get("reason") or s.get("source") or ""
        lines.append(f"| {name} | {s.get('status')} | {str(note)[:160]} |")
    return lines


def _tests(s: dict) -> list[str]:
    if s.get("status") not in ("ok", "failed") or "tests" not in s:
        return []
    gone = ", ".join(s["missing_modules"]) or "none"
    lines = [f"GPU tests (pytest -m gpu_only): {s['tests']} collected, {s['failures']} failed, {s['errors']} "
             f"errors, {s['skipped']} skipped; modules missing here: {gone}"]
    return lines + [f"- FAILED {name}" for name in s.get("failed", [])]


def _parity(s: dict) -> list[str]:
    if "bundles" not in s:
        return []
    lines = ["| bundle | precision vs IEEE fp32 | frames | non-finite | max score diff (of score range) | "
             "max map diff | verdict flips (near threshold) |", "|---|---|---:|---:|---:|---:|---|"]
    for name, row in s["bundles"].items():
        for precision, r in row.get("vs_fp32", {}).items():
            flips = f"{len(r['verdict_flips'])} ({len(r['flips_near_threshold'])})"
            lines.append(f"| {name} | {precision} | {r['frames']} | {r['nonfinite_scores']} | "
                         f"{_f(r['max_score_diff_rel'], '.2e')} | {_f(r['max_map_diff'], '.2e')} | {flips} |")
    return lines


def _throughput(s: dict) -> list[str]:
    if "bundles" not in s:
        return []
    lines = [f"Tiles: {s['tiles']}.", "",
             "| bundle | mode | streams | batch | tiles/s | ms/batch p50 | p99 | GPU MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in s["bundles"].items():
        for r in rows:
            lines.append(f"| {name} | {r['mode']} | {r['streams']} | {r['batch']} | {r['tiles_per_s']:.0f} | "
                         f"{r['ms_p50']:.2f} | {r['ms_p99']:.2f} | {_f(r['gpu_mib'], '.0f')} |")
    return lines


def _latency(s: dict) -> list[str]:
    if "runs" not in s:
        return []
    lines = [f"Daemon: bundle {s['bundle']}, {s['engine']}, 1 camera, mono8 raw frames.", "",
             "| frame | offered/s | sent | answered | drops | p50 ms | p99 ms | engine alone p99 ms | "
             "added p99 ms | infer p50 ms | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, r in s["runs"].items():
        if "latency_ms" not in r:
            lines.append(f"| {label} | | | | | | | | | | {r['status']}: {r.get('reason')} |")
            continue
        own = (r.get("engine_own_ms") or {}).get("p99")
        infer = r["stages_ms"].get("infer", {}).get("p50")
        lat = r["latency_ms"]
        lines.append(f"| {label} | {r['offered_fps']:.1f} | {r['sent']} | {r['answered']} | {r['drops']} | "
                     f"{_f(lat['p50'], '.1f')} | {_f(lat['p99'], '.1f')} | {_f(own, '.1f')} | "
                     f"{_f(r.get('added_p99_ms'), '.1f')} | {_f(infer, '.1f')} | {r['status']} |")
    return lines


def markdown(report: dict) -> str:
    sections = report["sections"]
    env = sections["env"]
    parts = ["# GPU check", "", *_machine(env), "",
             f"Elapsed {report.get('elapsed_s')} s of a {report['budget_s']:.0f} s budget.", "",
             *_status(sections)]
    if env.get("missing"):
        parts += ["", "Not installed here: " + "; ".join(f"{m} ({why})" for m, why in env["missing"].items())]
    for title, render, key in (("Tests", _tests, "tests"), ("FP16 / TF32 vs FP32 parity", _parity, "parity"),
                               ("Throughput", _throughput, "throughput"), ("Latency", _latency, "latency")):
        body = render(sections.get(key, {}))
        if body:
            machine = _machine(env)[:1 if key in ("tests", "parity") else 2]  # timings: the CPU too
            parts += ["", f"## {title}", "", *machine, "", *body]
    return "\n".join(parts) + "\n"
