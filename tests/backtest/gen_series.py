#!/usr/bin/env python3
"""Realistic generated series for `edgegate backtest --labels` (NAB-like: 5-minute readings,
~6,300 per series, incident windows of 10% of the series divided by the number of incidents,
centred on each incident's onset).

Usage: gen_series.py OUT_DIR [SEED] [KIND]   (writes OUT_DIR/*.csv and OUT_DIR/labels.json)

KIND `basic` (default): the first set. KIND `hard`: 13 other series for the gaps the basic set
does not show (weekly steps, small lasting shifts, low counts, sustained latency, spike density,
contextual and flat-middle days, slow ramps, bursty steps that become the new normal, irregular
traffic, noiseless sawtooth); written before tuning on them.
"""
import datetime, json, math, os, random, sys

out = sys.argv[1]
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
kind = sys.argv[3] if len(sys.argv) > 3 else "basic"
rng = random.Random(seed)
N, STEP = 6300, 300
T0 = datetime.datetime(2024, 1, 1)
DAY = 288
os.makedirs(out, exist_ok=True)
labels = {}


def write(name, values, onsets, times=None):
    times = times or [T0 + datetime.timedelta(seconds=STEP * i) for i in range(len(values))]
    fmt = lambda t: t.strftime("%Y-%m-%d %H:%M:%S")
    with open(os.path.join(out, name), "w") as f:
        f.write("timestamp,value\n")
        for t, v in zip(times, values):
            f.write(f"{fmt(t)},{v:.6g}\n")
    half = int(0.1 * len(values) / max(1, len(onsets)) / 2)
    labels[name] = [[fmt(times[max(0, o - half)]), fmt(times[min(len(values) - 1, o + half)])] for o in onsets]


def daily(i, amp=1.0, phase=0.0):
    return amp * math.sin(2 * math.pi * i / DAY + phase)


def weekly(i):
    return 1.0 if (i // DAY) % 7 < 5 else 0.6


def poisson(lam):
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    k, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def student_t3():
    return rng.gauss(0, 1) / math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3)


def hard():
    weekend = lambda i: (i // DAY) % 7 >= 5
    # h1. Server CPU: daily cycle, level steps down every weekend; one weekday looks like a
    # weekend (contextual) on day 15.
    at = 15 * DAY + 20
    write("weekly_steps_cpu.csv",
          [(35 if weekend(i) or at <= i < at + 200 else 60) + 15 * daily(i) + rng.gauss(0, 3)
           + (rng.random() < 0.01) * rng.uniform(10, 25) for i in range(N)], [at])
    # h2. Small lasting shift (+2 sigma) on AR(1) noise.
    at, e, v = rng.randint(3600, 5000), 0.0, []
    for i in range(N):
        e = 0.5 * e + rng.gauss(0, 0.87)
        v.append(10 + e + (2.0 if i >= at else 0))
    write("small_shift_ar.csv", v, [at])
    # h3. Small lasting shift (-2.5 scale) under heavy-tailed noise and a daily cycle.
    at = rng.randint(3600, 5000)
    write("small_shift_heavy.csv",
          [50 + 3 * daily(i) + student_t3() - (2.5 if i >= at else 0) for i in range(N)], [at])
    # h4. Tweet counts: low Poisson counts, daily and weekly cycle; a surge for 3 hours.
    at = rng.randint(3600, 5600)
    write("tweet_counts.csv",
          [poisson(6 * (1 + 0.6 * daily(i)) * (0.7 if weekend(i) else 1)
                   * (1 + 3 * min(1, (i - at) / 12) if at <= i < at + 36 else 1)) for i in range(N)],
          [at])
    # h5. Request latency: lognormal with 0.5% normal spikes; sustained x1.6 for 6 hours.
    at = rng.randint(3600, 5600)
    write("latency_sustained.csv",
          [200 * math.exp(rng.gauss(0, 0.3)) * (5 if rng.random() < 0.005 else 1)
           * (1.6 if at <= i < at + 72 else 1) for i in range(N)], [at])
    # h6. Artificial daily pattern with small noise; one day's peak 1.5x higher.
    day = rng.randint(13, 19)
    at = day * DAY + 60
    write("art_daily_jumpsup.csv",
          [(20 + 60 * max(0, daily(i, 1, -1))) * (1.5 if at <= i < day * DAY + 150 else 1)
           + rng.gauss(0, 2) for i in range(N)], [at])
    # h7. Artificial daily pattern; in one day's middle the cycle stops (noise around its mean).
    day = rng.randint(13, 19)
    at = day * DAY + 40
    write("art_flatmiddle.csv",
          [(50 if at <= i < at + 140 else 50 + 30 * daily(i)) + rng.gauss(0, 2)
           for i in range(N)], [at])
    # h8. Spikes about once a day are normal; for a day they come every hour.
    at = rng.randint(3600, 5600)
    write("spike_density.csv",
          [5 + rng.gauss(0, 0.5) + (rng.random() < (1 / 12 if at <= i < at + DAY else 1 / 288)) * 15
           for i in range(N)], [at])
    # h9. Machine temperature: slow random walk; a slow ramp (+6 over 12 h) before a failure.
    at, x, v = rng.randint(3600, 5400), 70.0, []
    for i in range(N):
        x += 0.03 * (70 - x) + rng.gauss(0, 0.5)
        r = 6 * min(1, (i - at) / 144) if at <= i < at + 180 else 0
        v.append(x + r - (30 if at + 180 <= i < at + 200 else 0))
    write("machine_temp_ramp.csv", v, [at])
    # h10. Network in: Pareto bursts; the level doubles and stays (the new normal).
    at = rng.randint(3600, 5000)
    write("network_step.csv",
          [(2 if i >= at else 1) * (1e6 * (1 + 0.3 * rng.random()) + (rng.random() < 0.03) * 1e6 * rng.paretovariate(1.5))
           for i in range(N)], [at])
    # h11. Noiseless sawtooth (6 h period) plus a slower sine: nothing to find.
    write("sawtooth_no_noise.csv",
          [(i % 72) / 72 * 10 + 3 * math.sin(2 * math.pi * i / 500) for i in range(N)], [])
    # h12. Counts with daily and weekly cycles and weekend steps: nothing to find.
    write("weekly_counts_quiet.csv",
          [poisson(40 * (1 + 0.5 * daily(i)) * (0.4 if weekend(i) else 1)) for i in range(N)], [])
    # h13. Traffic speed, irregular sampling, rush-hour dips daily; a 2-hour slowdown at night.
    vals, times, t = [], [], T0
    at = rng.randint(3600, 5600)
    at -= at % DAY - 30  # 02:30
    for i in range(N):
        t += datetime.timedelta(seconds=STEP if rng.random() > 0.1 else STEP * rng.randint(2, 12))
        idx = int((t - T0).total_seconds() // STEP)
        h = (idx % DAY) / 12
        rush = 25 if 7 <= h < 9 or 16.5 <= h < 18.5 else 0
        slow = 40 if at <= i < at + 24 else 0
        vals.append(max(3, 65 - rush - slow + rng.gauss(0, 4)))
        times.append(t)
    write("traffic_irregular.csv", vals, [at], times)


if kind == "hard":
    hard()
    with open(os.path.join(out, "labels.json"), "w") as f:
        json.dump(labels, f, indent=1)
    print(len(labels), "series", sum(len(w) for w in labels.values()), "windows")
    sys.exit(0)

# 1. Noiseless daily sine: nothing to find.
write("sine_no_noise.csv", [50 + 20 * daily(i) for i in range(N)], [])
# 2. Pump square wave, 8 h a day, noiseless: nothing to find.
write("pump_8h_no_noise.csv", [3.2 if (i % DAY) < 96 else 0.0 for i in range(N)], [])
# 3. Constant series: nothing to find.
write("flat.csv", [42.0] * N, [])
# 4. Daily + weekly cycle with noise; one jump up for half a day.
at = 4300
write("daily_weekly_jump.csv",
      [weekly(i) * (100 + 30 * daily(i)) + rng.gauss(0, 3) + (60 if at <= i < at + 144 else 0)
       for i in range(N)], [at])
# 5. Counts with bursts (Poisson-like with normal bursts), one huge burst.
v, burst = [], 0
at = 5000
for i in range(N):
    lam = 20 + 10 * daily(i)
    if rng.random() < 0.01:
        burst = rng.randint(3, 12)
    if burst:
        lam *= 2.5
        burst -= 1
    if at <= i < at + 24:
        lam *= 12
    # Poisson by normal approximation (lam >= 10)
    v.append(max(0, round(rng.gauss(lam, math.sqrt(lam)))))
write("counts_bursts.csv", v, [at])
# 6. Level shift that becomes the new normal (cloud CPU).
at = 3500
write("cpu_level_shift.csv",
      [(35 if i >= at else 12) + abs(rng.gauss(0, 2)) + (rng.random() < 0.02) * rng.uniform(5, 15)
       for i in range(N)], [at])
# 7. Heavy tails (log-normal) with a drop to zero (outage).
at = 4700
write("heavy_tail_outage.csv",
      [0.0 if at <= i < at + 36 else 10 * math.exp(rng.gauss(0, 0.6)) for i in range(N)], [at])
# 8. Machine temperature: slow random walk, irregular sampling, two failures (drops).
vals, times, t, x = [], [], T0, 80.0
fails = [2600, 5200]
for i in range(N):
    t += datetime.timedelta(seconds=STEP if rng.random() > 0.05 else STEP * rng.randint(2, 30))
    x += 0.05 * (80 - x) + rng.gauss(0, 0.4)
    y = x
    for f in fails:
        if f <= i < f + 60:
            y = x - 25 * min(1.0, (i - f) / 10)
    vals.append(y)
    times.append(t)
write("machine_temp_irregular.csv", vals, fails, times)
# 9. Stuck sensor: noisy daily signal stuck for a day.
at = 3900
v = [20 + 5 * daily(i) + rng.gauss(0, 0.3) for i in range(N)]
for i in range(at, at + DAY):
    v[i] = round(v[at], 6)
write("stuck_sensor.csv", v, [at])
# 10. Ad exchange CPC (hourly-ish pattern, lognormal), two spikes.
spikes = [2200, 5400]
write("cpc_spikes.csv",
      [(0.8 + 0.3 * daily(i)) * math.exp(rng.gauss(0, 0.15)) * (4 if any(s <= i < s + 3 for s in spikes) else 1)
       for i in range(N)], spikes)
# 11. Random walk with slow drift (no incident).
x, v = 50.0, []
for i in range(N):
    x += rng.gauss(0.002, 0.3)
    v.append(x)
write("random_walk.csv", v, [])
# 12. Quantized steady signal (0..3 with rare changes): nothing to find.
x, v = 1, []
for i in range(N):
    if rng.random() < 0.02:
        x = min(3, max(0, x + rng.choice([-1, 1])))
    v.append(x)
write("quantized.csv", v, [])
# 13. Noisy sine whose noise grows 5x (bearing wear), one incident.
at = 4500
write("variance_up.csv",
      [30 + 8 * daily(i) + rng.gauss(0, 0.5 * (5 if i >= at else 1)) for i in range(N)], [at])
# 14. Pump 8 h a day with noise; one day it does not stop (runs on), and its current rises.
at = 19 * DAY + 100   # (was 22 days: past the end of the series)
write("pump_runs_on.csv",
      [(3.2 + rng.gauss(0, 0.05) + (1.5 if at <= i < at + 150 else 0)) if ((i % DAY) < 96 or at <= i < at + 150) else 0.0
       for i in range(N)], [at])

with open(os.path.join(out, "labels.json"), "w") as f:
    json.dump(labels, f, indent=1)
print(len(labels), "series", sum(len(w) for w in labels.values()), "windows")
