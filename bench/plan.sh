#!/usr/bin/env bash
# Benchmark: `fleetwave validate` and `fleetwave plan` on generated fleets of 10,000 and
# 100,000 hosts; wall time and peak memory, next to PyYAML's C loader reading the same
# file (what a hand-rolled Python check would pay just to parse it).
# `plan` is measured in each output format (text, markdown, json).
# Usage: bench/plan.sh [RUNS=3]   Prints Markdown tables; figures are the median of RUNS.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
WORK=$(mktemp -d /tmp/fleetwave-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

command -v /usr/bin/time >/dev/null || { echo "bench/plan.sh needs GNU time (apt-get install time)" >&2; exit 2; }
python3 -c 'import yaml; yaml.CSafeLoader' 2>/dev/null || { echo "bench/plan.sh needs PyYAML with libyaml (apt-get install python3-yaml)" >&2; exit 2; }

cargo build --release --quiet --bin fleetwave --example gen_fleet
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release/fleetwave

# Median wall seconds and peak RSS (MB) of a command over RUNS runs.
measure() {
    local times=() mems=()
    for _ in $(seq "$RUNS"); do
        /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >/dev/null 2>&1 || true
        read -r t m < <(tail -n 1 "$WORK/time")
        times+=("$t"); mems+=("$m")
    done
    python3 - "${times[@]}" -- "${mems[@]}" <<'PY'
import statistics, sys
a = sys.argv[1:]; i = a.index("--")
t = [float(x) for x in a[:i]]; m = [int(x) for x in a[i+1:]]
print(f"{statistics.median(t):.2f} s | {statistics.median(m)/1024:.0f} MB")
PY
}

echo "| fleet | YAML | validate: time | validate: peak memory | plan: time | plan: peak memory | PyYAML CSafeLoader, parse only: time | PyYAML: peak memory |"
echo "|---|---|---|---|---|---|---|---|"
formats=""
for n in 10000 100000; do
    for layout in one-file split; do
        dir="$WORK/$layout-$n"
        if [ "$layout" = split ]; then
            "$TARGET"/release/examples/gen_fleet "$n" "$dir" --split 2>/dev/null
            what="$n hosts, 400 room files"
        else
            "$TARGET"/release/examples/gen_fleet "$n" "$dir" 2>/dev/null
            what="$n hosts, one file"
        fi
        f="$dir/fleet.yaml"
        size=$(du -ch "$dir"/fleet.yaml $(ls "$dir"/rooms/*.yaml 2>/dev/null) | tail -1 | cut -f1)
        v=$(measure "$BIN" validate "$f")
        p=$(measure "$BIN" plan "$f" --observed "$dir/observed.json")
        y=$(measure python3 -c 'import glob, os, sys, yaml
d = os.path.dirname(sys.argv[1])
for f in [sys.argv[1]] + sorted(glob.glob(d + "/rooms/*.yaml")):
    yaml.load(open(f), Loader=yaml.CSafeLoader)' "$f")
        echo "| $what | $size | $v | $p | $y |"
        formats+="| $what | $p"
        for fmt in markdown json; do
            formats+=" | $(measure "$BIN" plan "$f" --observed "$dir/observed.json" --format "$fmt")"
        done
        formats+=$' |\n'
    done
done
echo
echo "plan in each output format (stdout to /dev/null):"
echo
echo "| fleet | text: time | text: peak memory | markdown: time | markdown: peak memory | json: time | json: peak memory |"
echo "|---|---|---|---|---|---|---|"
printf '%s' "$formats"
echo
echo "Phases of one plan run at 100,000 hosts (FLEETWAVE_TIMINGS=1):"
for layout in one-file split; do
    echo "  $layout:"
    for fmt in text json; do
        echo "    --format $fmt:"
        { FLEETWAVE_TIMINGS=1 "$BIN" plan "$WORK/$layout-100000/fleet.yaml" --observed "$WORK/$layout-100000/observed.json" --format "$fmt" 2>&1 >/dev/null || true; } | sed 's/^/      /'
    done
done
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
