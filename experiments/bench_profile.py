"""Profile breakdown for ``experiments/bench_train_step.py --profile DIR``: XLA:CPU's thunk self-time
of a traced train step, split by what each thunk does (from the optimized HLO: matmul, elementwise,
reduction, copy, scan slicing, ...) and by the model part its ``op_name`` metadata names."""
from __future__ import annotations

import os
import re


_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")


def _parse_hlo(text: str) -> tuple[dict[str, dict], dict[str, set]]:
    """Instructions of an optimized HLO module: name -> {opcode, kind, calls, op_name}, and per
    computation the set of opcodes it contains."""
    instrs: dict[str, dict] = {}
    comps: dict[str, set] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("(")[0]:
            current = head.group(1)
            comps[current] = set()
            continue
        m = _HLO_INSTR.match(line)
        if not m:
            continue
        name, opcode, rest = m.groups()
        kind = re.search(r"kind=(k\w+)", rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        instrs[name] = {"opcode": opcode, "kind": kind.group(1) if kind else None,
                        "calls": calls.group(1) if calls else None, "op_name": op_name.group(1) if op_name else "",
                        "comp": current}
        if current is not None:
            comps[current].add(opcode)
    return instrs, comps


_MOVE_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape", "constant", "broadcast", "slice", "concatenate"}


def classify_hlo_op(name: str, instrs: dict, comps: dict) -> str:
    """What an XLA:CPU thunk does: matmul, elementwise/reduce fusion, copy/transpose, scan slicing, ..."""
    ins = instrs.get(name)
    if ins is None:
        return "other"
    op = ins["opcode"]
    if op in ("dot", "convolution"):
        return "matmul (Eigen dot)"
    if op == "custom-call":
        return "custom-call"
    if op in ("copy", "transpose"):
        return "copy/transpose"
    if op in ("dynamic-slice", "dynamic-update-slice"):
        return "scan dynamic-(update-)slice"
    if op in ("while", "conditional", "call"):
        return "control flow"
    if op != "fusion":
        return f"other ({op})"
    inner = set(comps.get(ins["calls"], set()))
    if "dot" in inner or "convolution" in inner:
        return "matmul (YNNPACK fusion)" if ins["kind"] == "kCustom" else "matmul (fusion)"
    if inner & {"dynamic-update-slice", "dynamic-slice"}:
        return "scan dynamic-(update-)slice"
    if inner and inner <= _MOVE_OPS:
        if inner & {"copy", "transpose"} or "copy" in name or "transpose" in name:
            return "copy/transpose"
        return "broadcast/fill/slice"
    if "reduce" in inner:
        return "reduction fusion"
    return "elementwise loop fusion" + (" (YNNPACK)" if ins["kind"] == "kCustom" else "")


def scope_of(op_name: str) -> str:
    """Which part of the step an HLO op comes from, from its op_name metadata."""
    bwd = "transpose(" in op_name
    if "DiT" not in op_name:
        if any(k in op_name for k in ("threefry", "_normal", "_uniform", "random")):
            return "rng"
        return "optimizer + EMA + loss (outside the model)"
    path = [seg for seg in op_name.split("/") if seg and not any(
        seg.startswith(x) for x in ("jit(", "jvp(", "transpose(", "while", "body", "eval_jaxpr", "closed_call",
                                    "checkpoint", "remat", "cond", "pjit"))]
    mods = path[:-1]  # the last segment is the primitive
    if any(m in ("norm1", "norm2", "norm_final") for m in mods):
        part = "LayerNorm"
    elif any(m in ("q_norm", "k_norm") for m in mods):
        part = "QK RMSNorm"
    elif "adaLN_modulation" in mods:
        part = "adaLN"
    elif "mlp" in mods:
        part = "MLP (fc1, GELU, fc2)"
    elif "attn" in mods:
        part = "attention (qkv, softmax, proj)"
    elif mods and mods[-1] == "blocks":
        part = "block: modulate / gate / residual"
    else:
        part = "embedders / final layer / other"
    return part + (" [bwd]" if bwd else " [fwd]")


def profile_breakdown(runner, steps: int, logdir: str) -> dict:
    """Traces ``steps`` train steps with jax.profiler and splits XLA:CPU's thunk self-time (summed over
    its threads; nested thunks, e.g. a while loop's body, are not double counted) by what the thunks
    do (classify_hlo_op) and where they come from in the model (scope_of). ``runner``: a
    ``bench_train_step.Runner`` of the jax impl (``run(n)``, ``info["compiled"]``)."""
    import glob

    import jax

    with jax.profiler.trace(logdir):
        runner.run(steps)
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    pd = jax.profiler.ProfileData.from_file(files[-1])
    instrs, comps = _parse_hlo(runner.info["compiled"].as_text())
    by_kind: dict[str, float] = {}
    by_scope: dict[str, float] = {}
    by_scope_kind: dict[str, float] = {}
    top: dict[str, float] = {}
    total = 0.0
    for plane in pd.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            evs = []
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats and e.duration_ns > 0:
                    evs.append((e.start_ns, e.start_ns + e.duration_ns, stats["hlo_op"]))
            evs.sort(key=lambda t: (t[0], -t[1]))
            stack: list[list] = []  # [end, name, self_ns]

            def close(item):
                nonlocal total
                _, nm, self_ns = item
                kind = classify_hlo_op(nm, instrs, comps)
                scope = scope_of(instrs.get(nm, {}).get("op_name", ""))
                by_kind[kind] = by_kind.get(kind, 0.0) + self_ns
                by_scope[scope] = by_scope.get(scope, 0.0) + self_ns
                by_scope_kind[f"{scope} | {kind}"] = by_scope_kind.get(f"{scope} | {kind}", 0.0) + self_ns
                top[nm] = top.get(nm, 0.0) + self_ns
                total += self_ns

            for start, end, nm in evs:
                while stack and stack[-1][0] <= start:
                    close(stack.pop())
                if stack:
                    stack[-1][2] -= min(end, stack[-1][0]) - start
                stack.append([end, nm, end - start])
            while stack:
                close(stack.pop())
    per_step = lambda d: {k: v / steps / 1e6 for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return {"steps": steps, "thunk_ms_per_step": total / steps / 1e6, "by_kind_ms": per_step(by_kind),
            "by_scope_ms": per_step(by_scope), "by_scope_kind_ms": per_step(by_scope_kind),
            "top_ops_ms": dict(list(per_step(top).items())[:15]),
            "top_ops_kind": {k: classify_hlo_op(k, instrs, comps) for k in list(per_step(top))[:15]}}


def format_profile(prof: dict, title: str) -> str:
    tot = prof["thunk_ms_per_step"]
    lines = [f"Profile of {title}: XLA thunk self-time {tot:.1f} ms per step ({prof['steps']} steps traced)", "",
             "| kind | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {100 * v / tot:.1f}% |" for k, v in prof["by_kind_ms"].items()]
    lines += ["", "| part of the step | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {100 * v / tot:.1f}% |" for k, v in prof["by_scope_ms"].items()]
    lines += ["", "| part \\| kind (top 25) | ms/step | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {100 * v / tot:.1f}% |" for k, v in list(prof["by_scope_kind_ms"].items())[:25]]
    lines += ["", "| top HLO ops | kind | ms/step |", "|---|---|---|"]
    lines += [f"| {k} | {prof['top_ops_kind'][k]} | {v:.1f} |" for k, v in prof["top_ops_ms"].items()]
    return "\n".join(lines)
