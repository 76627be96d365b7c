"""The peer benchmark's results: one row per job, a summary per network with our ratio to the
best peer, written as Markdown and JSON (atomically, through ``boneage_jax.io``).

A row is a dict with ``network``, ``stack``, ``round`` (1 unless ``--rounds`` ran each job more
than once), ``status`` (``ok``, ``failed``, ``timeout``,
``no interpreter``) and, for ``ok``, the job's report (``images_per_s``, ``step_s_median``,
``first_step_s``, ``parameters``, ``built``, ...); every row that ran has the harness's
``others_cpu_pct``, ``job_cpu_pct`` and ``wall_s``, and ``note`` (the error line of a failed job,
or a CPU that never got quiet before it). Rows of an interleaved run (``run.py --interleave``)
have ``interleaved`` True and their step times in turn order (``step_s``); their summary adds
:func:`paired`.
"""

from __future__ import annotations

import json
import statistics

from benchmarks.peers.job_common import NETWORKS
from boneage_jax import io

STACK_NAMES = {
    "ours": "ours (JAX)",
    "torch": "PyTorch eager",
    "torch_compile": "PyTorch torch.compile",
    "keras": "Keras 3 (TensorFlow)",
}
OURS = "ours"


def images_per_s(rows: list[dict], network: str, stack: str) -> float | None:
    """images/s of the job ``(network, stack)``: the median over its successful rounds, or None."""
    speeds = [row["images_per_s"] for row in rows
              if row["network"] == network and row["stack"] == stack and row["status"] == "ok"]
    return statistics.median(speeds) if speeds else None


def paired(rows: list[dict], network: str, stacks: list[str]) -> dict | None:
    """For an interleaved run of ``network``: per turn, the fastest peer's step time in that turn
    over ours (above 1: ours was faster), as ``median``, quartiles ``q1``, ``q3``, ``ours_faster``
    (turns where it was above 1) and ``turns``; None unless ours and a peer ran interleaved."""
    def times(stack: str) -> list[float] | None:
        for row in rows:
            if (row["network"] == network and row["stack"] == stack and row["status"] == "ok"
                    and row.get("interleaved") and row.get("step_s")):
                return row["step_s"]
        return None

    ours = times(OURS)
    peers = [t for t in (times(stack) for stack in stacks if stack != OURS) if t is not None]
    if ours is None or not peers:
        return None
    turns = min(len(ours), *(len(t) for t in peers))
    ratios = [min(t[i] for t in peers) / ours[i] for i in range(turns)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if turns > 1 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3,
            "ours_faster": sum(ratio > 1 for ratio in ratios), "turns": turns}


def summary(rows: list[dict], networks: list[str], stacks: list[str]) -> list[dict]:
    """Per network (in order, those with a row): each stack's images/s (None where it failed or
    has not run; the median of its rounds), the best peer (the fastest stack other than ours) and
    ours / best peer."""
    out = []
    for network in networks:
        if not any(row["network"] == network for row in rows):
            continue
        speeds = {stack: images_per_s(rows, network, stack) for stack in stacks}
        peers = {stack: speed for stack, speed in speeds.items() if stack != OURS and speed is not None}
        best = max(peers, key=peers.get) if peers else None
        ours = speeds.get(OURS)
        ratio = ours / peers[best] if ours is not None and best is not None else None
        out.append({"network": network, "images_per_s": speeds, "best_peer": best, "ours_to_best_peer": ratio,
                    "paired": paired(rows, network, stacks)})
    return out


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _header_lines(header: dict) -> list[str]:
    lines = [f"# {header['title']}", ""]
    lines += [f"- {key}: {value}" for key, value in header["facts"].items()]
    return lines


def markdown(header: dict, rows: list[dict], networks: list[str], stacks: list[str]) -> str:
    """The summary table (images/s per stack, best peer, ours / best peer) and every job's row."""
    lines = _header_lines(header)
    names = [STACK_NAMES[stack] for stack in stacks]
    rounds = max((row.get("round", 1) for row in rows), default=1)
    per_job = "batch / median step time" + (f"; the median of {rounds} rounds, run interleaved" if rounds > 1 else "")
    entries = summary(rows, networks, stacks)
    interleaved = any(row.get("interleaved") for row in rows)
    if interleaved:
        per_job = "batch / median step time; the stacks stepped in turns"
    lines += ["", f"images/s ({per_job}); higher is better.", "",
              "| network | " + " | ".join(names) + " | best peer | ours / best peer |"
              + (" turn by turn: median (quartiles), turns ours faster |" if interleaved else ""),
              "|---|" + "---:|" * len(stacks) + "---|---:|" + ("---:|" if interleaved else "")]
    for entry in entries:
        speeds = " | ".join(_number(entry["images_per_s"][stack]) for stack in stacks)
        best = STACK_NAMES[entry["best_peer"]] if entry["best_peer"] else "n/a"
        line = f"| {NETWORKS[entry['network']]} | {speeds} | {best} | {_number(entry['ours_to_best_peer'])} |"
        if interleaved:
            pair = entry["paired"]
            line += (f" {pair['median']:.2f} ({pair['q1']:.2f}-{pair['q3']:.2f}), {pair['ours_faster']} of "
                     f"{pair['turns']} |" if pair else " n/a |")
        lines.append(line)
    if interleaved:
        lines += ["", "Turn by turn: in each turn every stack ran one step; the fastest peer's step time in that "
                  "turn over ours (above 1: ours faster), its median and quartiles over the turns, and in how many "
                  "turns ours was the faster."]
    lines += ["", "## Every job", "",
              "| network | stack | round | status | images/s | median step (s) | min-max step (s) "
              "| first step with compile (s) | trainable parameters | others' CPU % | job's CPU % | what ran / note |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        ok = row["status"] == "ok"
        others = _number(row.get("others_cpu_pct"), 1)
        own = _number(row.get("job_cpu_pct"), 1)
        what = "; ".join(part for part in (row.get("built", ""), row.get("note", "")) if part).replace("|", "/")
        if ok:
            cells = [_number(row["images_per_s"]), _number(row["step_s_median"], 3),
                     f"{row['step_s_min']:.3f}-{row['step_s_max']:.3f}", _number(row["first_step_s"], 1),
                     f"{row['parameters']:,}"]
        else:
            cells = ["", "", "", "", ""]
        lines.append(f"| {NETWORKS[row['network']]} | {STACK_NAMES[row['stack']]} | {row.get('round', 1)} | {row['status']} | "
                     + " | ".join(cells) + f" | {others} | {own} | {what} |")
    if interleaved:
        lines += ["", "others' CPU %: CPU time that other processes (the waiting jobs among them) used during the "
                  "job's timed steps, in percent of all CPUs (machine busy time from /proc/stat minus the job's own "
                  "user+system time from /proc/<pid>/stat); a figure above a few percent means the job's numbers "
                  "are noisy. job's CPU %: the job's own CPU time over its timed steps, in percent of all CPUs."]
    else:
        lines += ["", "others' CPU %: CPU time that other processes used while the job ran, in percent of all "
                  "CPUs (machine busy time from /proc/stat minus the job's own user+system time); a figure above "
                  "a few percent means the job's numbers are noisy. job's CPU %: the job's own CPU time, in "
                  "percent of all CPUs over its run (compilation and set-up included)."]
    return "\n".join(lines) + "\n"


def write(markdown_path: str, json_path: str, header: dict, rows: list[dict], networks: list[str],
          stacks: list[str]) -> None:
    """Writes both files atomically (called after every job, so a stopped run keeps its rows)."""
    document = {"header": header, "summary": summary(rows, networks, stacks), "rows": rows}
    io.write_text(json_path, json.dumps(document, indent=1, default=io.jsonable) + "\n")
    io.write_text(markdown_path, markdown(header, rows, networks, stacks))
