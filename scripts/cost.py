#!/usr/bin/env python3
"""pgshift's cost model: dollars per TB of full load and per month of an idle CDC task.

    python scripts/cost.py [--inputs docs/cost-inputs.json] [--template template.yaml] [--json]

It reads the template's settings (function memory, chunk size, S3 part size, chunk workflow type,
poll schedule, the alarms it creates) and the measured figures in docs/cost-inputs.json (full-load
MB/s per worker, the idle poll's duration and memory: the commands that measured them are in that
file), prices them at the published list prices below (us-east-1, arm64, no free tier), prints
every line item and exits 1 when a goal is missed: <= $0.50 per TB of full load, <= $1 per month
for an idle CDC task (the task itself; the optional metrics and alarms are priced on their own
line). docs/COST.md explains the model. Run by ./scripts/test.sh.
"""

import argparse
import json
import math
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Published list prices, us-east-1, as read on 2026-12-01 (aws.amazon.com/<service>/pricing).
PRICES = {
    "lambda_gb_s_arm64": 0.0000133334,
    "lambda_request": 0.20 / 1e6,
    "sfn_standard_transition": 0.025 / 1000,
    "sfn_express_request": 1.00 / 1e6,
    "sfn_express_gb_s": 0.00001667,  # first 1,000 GB-hours; 64 MB, 100 ms increments
    "s3_put": 0.005 / 1000,  # PUT, COPY, POST, LIST (multipart: create, each part, complete)
    "s3_get": 0.0004 / 1000,
    "ddb_write_unit": 0.625 / 1e6,  # on-demand, per write request unit (1 KB)
    "ddb_read_unit": 0.125 / 1e6,
    "secrets_api_call": 0.05 / 10000,
    "scheduler_invocation": 1.00 / 1e6,
    "cw_metric_month": 0.30,  # custom metric, first 10,000
    "cw_alarm_metric_month": 0.10,  # standard resolution, per metric in the alarm
    "cw_logs_gb": 0.50,
}
PRICES_DATED = "2026-12-01"
HOURS_PER_MONTH = 730


def template_settings(path):
    try:
        from samtranslator.yaml_helper import yaml_parse
    except ImportError:
        raise SystemExit("scripts/cost.py needs aws-sam-translator (the test tools' virtualenv has it)")
    t = yaml_parse(path.read_text())
    params, res = t["Parameters"], t["Resources"]
    fl = res["FullLoadFunction"]["Properties"]
    poller = res["CdcPollerFunction"]["Properties"]
    schedule = params["PollSchedule"]["Default"]
    m = re.fullmatch(r"rate\((\d+) (minute|minutes|hour|hours)\)", schedule)
    if not m:
        raise SystemExit(f"PollSchedule default {schedule!r}: the model reads rate(N minutes|hours) only")
    every_min = int(m.group(1)) * (60 if m.group(2).startswith("hour") else 1)
    watch = poller["Events"]["Watch"]["Properties"]["ScheduleExpression"]
    wm = re.fullmatch(r"rate\((\d+) minutes?\)", watch)
    alarms = {k: v for k, v in res.items() if v["Type"] == "AWS::CloudWatch::Alarm"}

    def alarm_metrics(a):
        return len([q for q in a["Properties"].get("Metrics", []) if "MetricStat" in q]) or 1

    return {
        "full_load_memory_mb": int(fl["MemorySize"]),
        "chunk_mb": int(params["ChunkMb"]["Default"]),
        "s3_part_mb": int(fl["Environment"]["Variables"]["PGSHIFT_S3_PART_MB"]),
        "chunk_workflow_type": params["ChunkWorkflowType"]["Default"],
        "poller_memory_mb": int(poller["MemorySize"]),
        "poll_every_min": every_min,
        "watch_every_min": int(wm.group(1)) if wm else None,
        # Alarms an idle CDC task has: not the apply ones (no target), not the poller-stopped
        # one (its condition: an enabled schedule) priced in, since an idle task polls.
        "alarm_metrics": sum(alarm_metrics(a) for k, a in alarms.items() if not k.startswith("Apply")),
    }


def full_load_per_tb(s, m):
    p = PRICES
    tb = 1e12
    chunk_bytes = s["chunk_mb"] * 2**20
    chunks = math.ceil(tb / chunk_bytes)
    # One PUT when the chunk's staged file fits a part, else create + parts + complete. Parts
    # upload two at a time while the export goes on (S3Writer): a chunk takes its export time,
    # or its upload time when two streams are slower, plus its last part's upload.
    staged = chunk_bytes * m["staged_bytes_per_heap_byte"]
    part = s["s3_part_mb"] * 2**20
    parts = math.ceil(staged / part)
    puts_per_chunk = 1 if parts == 1 else 2 + parts
    export_s = staged / (m["full_load_mb_per_s_per_worker"] * 1e6)
    stream = m["s3_upload_mb_per_s_per_stream"] * 1e6
    last_part = staged - (parts - 1) * part
    chunk_s = max(export_s, (staged - last_part) / (2 * stream)) + last_part / stream
    worker_s = chunk_s * chunks
    items = {
        "lambda compute": worker_s * s["full_load_memory_mb"] / 1024 * p["lambda_gb_s_arm64"],
        "lambda requests": (chunks + 2) * p["lambda_request"],
        "s3 requests": chunks * (puts_per_chunk * p["s3_put"] + m["s3_other_puts_per_chunk"] * p["s3_put"]),
        "dynamodb": chunks * (m["ddb_writes_per_chunk"] * p["ddb_write_unit"] + m["ddb_reads_per_chunk"] * p["ddb_read_unit"]),
        "secrets manager": chunks * m["secret_reads_per_chunk"] * p["secrets_api_call"],
    }
    if s["chunk_workflow_type"] == "EXPRESS":
        billed = max(0.1, math.ceil(chunk_s * 10) / 10)
        items["step functions"] = chunks * (
            m["parent_transitions_per_child"] * p["sfn_standard_transition"]
            + p["sfn_express_request"]
            + billed * 64 / 1024 * p["sfn_express_gb_s"]
        ) + 10 * p["sfn_standard_transition"]
    else:
        items["step functions"] = chunks * (m["parent_transitions_per_child"] + m["standard_child_transitions"]) * p["sfn_standard_transition"]
    items["logs"] = chunks * m["log_bytes_per_chunk"] / 1e9 * p["cw_logs_gb"]
    return {"chunks": chunks, "seconds_per_chunk": round(chunk_s, 2), "puts_per_chunk": puts_per_chunk}, items


def idle_cdc_per_month(s, m):
    p = PRICES
    polls = HOURS_PER_MONTH * 60 / s["poll_every_min"]
    watches = HOURS_PER_MONTH * 60 / s["watch_every_min"] if s["watch_every_min"] else 0
    gb = s["poller_memory_mb"] / 1024
    # A warm function reads the secret at most every 5 minutes (SECRET_TTL); a cold start reads it.
    secret_reads = min(polls + watches, HOURS_PER_MONTH * 12)
    items = {
        "lambda compute": (polls * m["idle_poll_ms"] + watches * m["watch_ms"]) / 1000 * gb * p["lambda_gb_s_arm64"],
        "lambda requests": (polls + watches) * p["lambda_request"],
        "scheduler": (polls + watches) * p["scheduler_invocation"],
        "dynamodb": polls * (m["idle_poll_ddb_writes"] * p["ddb_write_unit"] + m["idle_poll_ddb_reads"] * p["ddb_read_unit"]),
        "secrets manager": secret_reads * p["secrets_api_call"],
        "logs": (polls + watches) * m["log_bytes_per_invocation"] / 1e9 * p["cw_logs_gb"],
    }
    observability = {
        "custom metrics (3 an idle poll reports)": 3 * p["cw_metric_month"],
        f"alarms ({s['alarm_metrics']} alarm metrics)": s["alarm_metrics"] * p["cw_alarm_metric_month"],
    }
    return {"polls": int(polls), "watches": int(watches)}, items, observability


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default=str(ROOT / "docs" / "cost-inputs.json"))
    ap.add_argument("--template", default=str(ROOT / "template.yaml"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    m = json.loads(pathlib.Path(a.inputs).read_text())
    s = template_settings(pathlib.Path(a.template))
    load_info, load = full_load_per_tb(s, m)
    idle_info, idle, obs = idle_cdc_per_month(s, m)
    load_total, idle_total, obs_total = sum(load.values()), sum(idle.values()), sum(obs.values())
    if a.json:
        print(json.dumps({"template": s, "full_load_per_tb": load, "idle_cdc_per_month": idle,
                          "observability_per_month": obs, "totals": [load_total, idle_total, obs_total]}, indent=2))
    else:
        print(f"pgshift cost model (list prices us-east-1 of {PRICES_DATED}; measured {m['measured_on']}: {m['measured_by']})")
        print(f"template: full-load {s['full_load_memory_mb']} MB, {s['chunk_mb']} MB chunks, {s['s3_part_mb']} MiB parts, "
              f"{s['chunk_workflow_type']} children; poller {s['poller_memory_mb']} MB every {s['poll_every_min']} min, watch every {s['watch_every_min']} min")
        print(f"full load, per TB: {load_info['chunks']} chunks of {load_info['seconds_per_chunk']} s (export "
              f"{m['full_load_mb_per_s_per_worker']} MB/s a worker, upload {m['s3_upload_mb_per_s_per_stream']} MB/s a stream), "
              f"{load_info['puts_per_chunk']} S3 requests each")
        for k, v in load.items():
            print(f"  {k:<42} ${v:8.4f}")
        print(f"  {'total per TB (goal <= $0.50)':<42} ${load_total:8.4f}")
        print(f"idle CDC task, per month: {idle_info['polls']} polls of {m['idle_poll_ms']} ms, {idle_info['watches']} watches of {m['watch_ms']} ms")
        for k, v in idle.items():
            print(f"  {k:<42} ${v:8.4f}")
        print(f"  {'total per month (goal <= $1)':<42} ${idle_total:8.4f}")
        for k, v in obs.items():
            print(f"  + {k:<40} ${v:8.4f}")
        print(f"  {'with metrics and alarms':<42} ${idle_total + obs_total:8.4f}")
    missed = []
    if load_total > 0.50:
        missed.append(f"full load ${load_total:.2f}/TB > $0.50")
    if idle_total > 1.00:
        missed.append(f"idle CDC ${idle_total:.2f}/month > $1")
    if missed:
        print("cost goals missed: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
