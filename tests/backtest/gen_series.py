#!/usr/bin/env python3
"""Realistic generated series for `edgegate backtest --labels` (NAB-like: 5-minute readings,
~6,300 per series, incident windows of 10% of the series divided by the number of incidents,
centred on each incident's onset).

Usage: gen_series.py OUT_DIR [SEED] [KIND]   (writes OUT_DIR/*.csv and OUT_DIR/labels.json)

KIND `basic` (default): the first set. KIND `hard`: 13 other series for the gaps the basic set
does not show (weekly steps, small lasting shifts, low counts, sustained latency, spike density,
contextual and flat-middle days, slow ramps, bursty steps that become the new normal, irregular
traffic, noiseless sawtooth); written before tuning on them. KIND `nab`: 15 more (see `nab()`:
AWS CPU, weekly step-downs, mention counts with bursts, 1.5 and 3 sigma shifts, hourly and
irregular series, a long machine temperature series, batch jobs, quiet series).
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


def nab():
    """NAB-like kinds the other sets lack: AWS CPU on quantized levels with normal spikes and a
    level change, a weekly step-down with a contextual incident, bursty mention counts (heavy
    bursts are normal, a surge is not), small lasting shifts of 1.5 and 3 sigma, hourly ad
    exchange series with missing hours, irregular traffic occupancy, a long machine temperature
    series with a shutdown and a failure that drifts first, spike density that rises, batch-job
    disk writes, and quiet heavy-tailed and noisy series. Lengths and sampling vary as in NAB.
    Written before any tuning on them."""
    weekend = lambda i, day=DAY: (i // day) % 7 >= 5
    # n1. AWS CPU: quantized levels (0.066 steps), normal short spikes; the level changes and
    # stays (labelled at the change), later a spike far above the usual ones.
    n, at, sp = 4032, rng.randint(1500, 2500), rng.randint(3000, 3900)
    v = []
    for i in range(n):
        base = (2.0 if i < at else 3.4) + rng.gauss(0, 0.12)
        if rng.random() < 0.01:
            base += rng.uniform(1, 4)
        if sp <= i < sp + 3:
            base += 25
        v.append(round(base / 0.066) * 0.066)
    write("aws_cpu_level_spike.csv", v, [at, sp])
    # n2. Server requests: daily cycle and a step down every weekend; on one weekday the
    # level stays at the weekend's (contextual), later a burst of errors for 2 hours.
    n = 8064
    day0 = rng.randint(12, 18)
    while weekend(day0 * DAY):
        day0 += 1
    at, at2 = day0 * DAY + 30, (day0 + rng.randint(4, 6)) * DAY + rng.randint(60, 200)
    v = [max(0, (40 if weekend(i) or at <= i < at + 230 else 100) * (1 + 0.3 * daily(i))
             + rng.gauss(0, 4) + (60 if at2 <= i < at2 + 24 else 0)) for i in range(n)]
    write("requests_weekly_stepdown.csv", v, [at, at2])
    # n3. Twitter mentions: 15,800 counts, daily cycle, heavy normal bursts (a few a week,
    # Pareto sized, lasting 30 min to 2 h); two surges ten times larger, lasting 4-8 hours.
    n = 15800
    surges = sorted(rng.sample(range(4000, 15000, 500), 2))
    v, burst, size = [], 0, 1.0
    for i in range(n):
        lam = 8 * (1 + 0.5 * daily(i))
        if not burst and rng.random() < 0.004:
            burst, size = rng.randint(6, 24), 1 + min(8, rng.paretovariate(1.8))
        if burst:
            lam *= size
            burst -= 1
        for s0 in surges:
            if s0 <= i < s0 + 72:
                lam *= 12 * math.exp(-(i - s0) / 40)
        v.append(poisson(lam))
    write("twitter_mentions.csv", v, surges)
    # n4. Small lasting shift of 1.5 sigma on white noise (cloud disk latency).
    n, at = 4032, rng.randint(2200, 3400)
    write("small_shift_1p5.csv", [5 + rng.gauss(0, 1) + (1.5 if i >= at else 0) for i in range(n)], [at])
    # n5. Shift of 3 sigma under a daily cycle, irregular sampling (10% of gaps of 2-6 steps).
    vals, times, t, i = [], [], T0, 0
    at = rng.randint(2500, 3500)
    while len(vals) < 4032:
        t += datetime.timedelta(seconds=STEP * (1 if rng.random() > 0.1 else rng.randint(2, 6)))
        i = int((t - T0).total_seconds() // STEP)
        vals.append(30 + 10 * daily(i) + rng.gauss(0, 1) + (3 if len(vals) >= at else 0))
        times.append(t)
    write("small_shift_3_daily_irregular.csv", vals, [at], times)
    # n6. Ad exchange: hourly CPC, lognormal with a daily pattern, 5% of hours missing; a
    # spike of 6x for 2 hours, later the level falls by half and stays.
    vals, times, t = [], [], T0
    sp, at = rng.randint(500, 900), rng.randint(1100, 1400)
    k = 0
    while len(vals) < 1600:
        t += datetime.timedelta(hours=1 if rng.random() > 0.05 else rng.randint(2, 5))
        h = (t - T0).total_seconds() / 3600
        x = (0.6 + 0.25 * math.sin(2 * math.pi * h / 24)) * math.exp(rng.gauss(0, 0.2))
        x *= 6 if sp <= k < sp + 2 else 1
        x *= 0.5 if k >= at else 1
        vals.append(x)
        times.append(t)
        k += 1
    write("adexchange_cpc_hourly.csv", vals, [sp, at], times)
    # n7. Traffic occupancy (%), irregular sampling, rush-hour peaks; the sensor reads near 0
    # for 3 hours one afternoon (failure), later one reading of 100.
    vals, times, t = [], [], T0
    at, sp = rng.randint(1000, 1600), rng.randint(1800, 2300)
    while len(vals) < 2500:
        t += datetime.timedelta(seconds=STEP * (1 if rng.random() > 0.2 else rng.randint(2, 4)))
        h = ((t - T0).total_seconds() / 3600) % 24
        occ = 5 + 20 * math.exp(-((h - 8) ** 2) / 2) + 25 * math.exp(-((h - 17.5) ** 2) / 3)
        occ = max(0, occ * math.exp(rng.gauss(0, 0.15)))
        k = len(vals)
        if at <= k < at + 30:
            occ = rng.uniform(0, 0.5)
        if k == sp:
            occ = 100
        vals.append(occ)
        times.append(t)
    write("traffic_occupancy.csv", vals, [at, sp], times)
    # n8. Machine temperature, 22,000 readings: 85 degrees wandering; a planned shutdown
    # (cools to 25 over 2 h, 1 day off, back), later a failure preceded by a slow 12-hour
    # climb (+8) then a drop.
    n = 22000
    shut, fail = rng.randint(5000, 9000), rng.randint(13000, 19000)
    x, v = 85.0, []
    for i in range(n):
        x += 0.02 * (85 - x) + rng.gauss(0, 0.6)
        y = x
        if shut <= i < shut + 24 + DAY:
            y = 25 + (x - 25) * max(0, 1 - (i - shut) / 24) + rng.gauss(0, 0.3)
        elif shut + 24 + DAY <= i < shut + 48 + DAY:
            y = 25 + (x - 25) * (i - shut - 24 - DAY) / 24
        if fail - 144 <= i < fail:
            y = x + 8 * (i - fail + 144) / 144
        elif fail <= i < fail + 60:
            y = 40 + rng.gauss(0, 1)
        v.append(y)
    write("machine_temp_long.csv", v, [shut, fail - 144])
    # n9. Load balancer: a spike every ~12 hours on noise is normal; they come every 30 min
    # for half a day.
    n, at = 4032, rng.randint(2000, 3400)
    write("art_spike_density_up.csv",
          [20 + rng.gauss(0, 1) + (rng.random() < (1 / 6 if at <= i < at + 144 else 1 / 144)) * rng.uniform(20, 40)
           for i in range(n)], [at])
    # n10. Disk writes: a batch job every 6 hours writes for 30 min (huge), near 0 otherwise;
    # one run is skipped, and once it runs at a time it never did.
    n = 4032
    skip, odd = rng.randint(12, 14) * 4, rng.randint(1900, 2100) // 72 * 72 + 36
    v = []
    for i in range(n):
        run = (i % 72) < 6 and i // 72 != skip
        if odd <= i < odd + 6:
            run = True
        v.append((5e7 * math.exp(rng.gauss(0, 0.2)) if run else 0) + abs(rng.gauss(0, 2e4)))
    write("disk_write_batch.csv", v, sorted([skip * 72, odd]))
    # n11. Quiet series: lognormal request latency with 1% Pareto tails, nothing to find.
    write("latency_heavy_quiet.csv",
          [100 * math.exp(rng.gauss(0, 0.25)) * (rng.paretovariate(1.2) if rng.random() < 0.01 else 1)
           for i in range(4032)], [])
    # n12. Artificial noise (uniform + normal), nothing to find.
    write("art_noisy.csv", [rng.uniform(0, 1) * 10 + rng.gauss(0, 5) for i in range(4032)], [])
    # n13. Artificial daily pattern with small noise, nothing to find.
    write("art_daily_small_noise.csv",
          [20 + 60 * max(0, daily(i, 1, -1)) + rng.gauss(0, 2) for i in range(4032)], [])
    # n14. Perfect square wave, 12 h up and 12 h down, nothing to find.
    write("art_square_wave.csv", [80.0 if (i % DAY) < 144 else 20.0 for i in range(4032)], [])
    # n15. RDS CPU: slow growth over days, daily cycle, resets to low on a weekly maintenance
    # (normal); a sudden climb to 90% for 5 hours.
    n, at = 4032, rng.randint(2300, 3600)
    v = [min(100, 10 + 0.01 * (i % (7 * DAY)) + 5 * daily(i) + rng.gauss(0, 1.5)
             + (60 if at <= i < at + 60 else 0)) for i in range(n)]
    write("rds_cpu_growth.csv", v, [at])


if kind in ("hard", "nab"):
    hard() if kind == "hard" else nab()
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
