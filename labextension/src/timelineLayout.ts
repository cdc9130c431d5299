/**
 * The geometry of the timeline, apart from any drawing: one lane per worker,
 * one block per chunk, the time axis's ticks and their labels, and finding
 * the block under the pointer.  widget.ts paints what this lays out.
 */
import { Report, WorkerSummary } from './report';

// ------------------------------------------------------------------ the axis

/** An axis label for time `t`, in the unit that suits the whole axis (`tMax`). */
export function formatTick(t: number, tMax: number): string {
  if (t === 0) {
    return '0';
  }
  if (tMax < 1) {
    return `${Number((t * 1e3).toPrecision(6))} ms`;
  }
  if (tMax < 120) {
    return `${Number(t.toPrecision(6))} s`;
  }
  const s = Math.round(t);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

/** About `target` round tick values from 0 to `max` (1, 2, 5 × 10^k apart). */
export function niceTicks(max: number, target = 6): number[] {
  if (!(max > 0) || !Number.isFinite(max)) {
    return [0];
  }
  const raw = max / Math.max(1, target);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) ?? 10 * mag;
  const ticks: number[] = [];
  // Round away floating noise (0.30000000000000004) to the step's precision.
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  for (let t = 0; t <= max + step * 1e-9; t += step) {
    ticks.push(Number(t.toFixed(digits)));
  }
  return ticks;
}

// ----------------------------------------------------------------- the lanes

export interface LayoutOptions {
  /** Width of the whole drawing, in CSS pixels. */
  width: number;
  /** Left gutter for the lane names. */
  labelWidth?: number;
  /** Right gutter for the per-lane totals. */
  statsWidth?: number;
}

export interface Lane {
  name: string;
  /** Top of the lane, in CSS pixels from the top of the drawing. */
  y: number;
  height: number;
  iterations: number;
  busy: number;
  failed: number;
}

export interface Block {
  /** Index into the report's chunks. */
  chunk: number;
  lane: number;
  x: number;
  y: number;
  w: number;
  h: number;
  /** x of a red mark per failed iteration (deduplicated to whole pixels). */
  failedX: number[];
  retried: boolean;
  /** Alternate shade, so that neighbouring chunks in a lane stay apart. */
  shade: 0 | 1;
}

export interface Layout {
  width: number;
  height: number;
  /** Where time 0 is drawn. */
  x0: number;
  /** Pixels per second. */
  scale: number;
  /** The time at the right end of the axis. */
  tMax: number;
  laneHeight: number;
  axisY: number;
  lanes: Lane[];
  /** Sorted by lane, then by x: what hitTest searches. */
  blocks: Block[];
  /** First index in `blocks` of each lane, plus the end (lanes.length + 1 entries). */
  laneStart: number[];
  ticks: number[];
}

export const AXIS_HEIGHT = 20;

/** Lanes get thinner as workers are added: 20 px each for a few, 6 px at 64+. */
export function laneHeightFor(lanes: number): number {
  return Math.max(6, Math.min(20, Math.floor(400 / Math.max(1, lanes))));
}

/**
 * Lay out one lane per worker and one block per chunk.  Lanes follow the
 * report's worker order; a worker that only appears in chunks gets a lane
 * after them.  Time runs from 0 to max(wall, last chunk end) across the
 * drawing between the two gutters; a block is at least 1 px wide so that the
 * shortest chunk stays visible.
 */
export function layoutTimeline(r: Report, opts: LayoutOptions): Layout {
  const labelWidth = opts.labelWidth ?? 110;
  const statsWidth = opts.statsWidth ?? 90;
  const width = Math.max(opts.width, labelWidth + statsWidth + 50);
  const x0 = labelWidth;
  const plotWidth = width - labelWidth - statsWidth;

  const index = new Map<string, number>();
  const lanes: Lane[] = [];
  const addLane = (name: string, w?: WorkerSummary) => {
    index.set(name, lanes.length);
    lanes.push({
      name,
      y: 0,
      height: 0,
      iterations: w?.iterations ?? 0,
      busy: w?.busy ?? 0,
      failed: w?.failed ?? 0
    });
  };
  for (const w of r.workers) {
    if (!index.has(w.name)) {
      addLane(w.name, w);
    }
  }
  let tMax = r.wall;
  for (const c of r.chunks) {
    if (!index.has(c.worker)) {
      addLane(c.worker);
      const lane = lanes[lanes.length - 1];
      // Totals for a lane the workers list did not summarise.
      for (const d of r.chunks) {
        if (d.worker === c.worker) {
          lane.iterations += d.count;
          lane.busy += d.t_end - d.t_start;
          lane.failed += d.failed.length;
        }
      }
    }
    tMax = Math.max(tMax, c.t_end);
  }
  if (!(tMax > 0)) {
    tMax = 1;
  }

  const laneHeight = laneHeightFor(lanes.length);
  lanes.forEach((lane, i) => {
    lane.y = i * laneHeight;
    lane.height = laneHeight;
  });
  const scale = plotWidth / tMax;
  const gap = laneHeight >= 10 ? 2 : 1;

  const perLane: Block[][] = lanes.map(() => []);
  r.chunks.forEach((c, i) => {
    const lane = index.get(c.worker)!;
    const x = x0 + c.t_start * scale;
    const w = Math.max(1, (c.t_end - c.t_start) * scale);
    const failedX: number[] = [];
    let last = NaN;
    for (const f of [...c.failed].sort((a, b) => a - b)) {
      // Iterations are assumed evenly spread over the chunk's time.
      const frac = c.count > 0 ? (f - c.start + 0.5) / c.count : 0.5;
      const fx = Math.round(x + Math.min(1, Math.max(0, frac)) * w);
      if (fx !== last) {
        failedX.push(fx);
        last = fx;
      }
    }
    perLane[lane].push({
      chunk: i,
      lane,
      x,
      y: lanes[lane].y + gap / 2,
      w,
      h: laneHeight - gap,
      failedX,
      retried: c.retried,
      shade: 0
    });
  });
  const blocks: Block[] = [];
  const laneStart: number[] = [];
  for (const lb of perLane) {
    laneStart.push(blocks.length);
    lb.sort((a, b) => a.x - b.x || a.chunk - b.chunk);
    lb.forEach((b, k) => {
      b.shade = (k % 2) as 0 | 1;
      blocks.push(b);
    });
  }
  laneStart.push(blocks.length);

  const axisY = lanes.length * laneHeight;
  return {
    width,
    height: axisY + AXIS_HEIGHT,
    x0,
    scale,
    tMax,
    laneHeight,
    axisY,
    lanes,
    blocks,
    laneStart,
    ticks: niceTicks(tMax, Math.max(2, Math.floor(plotWidth / 80)))
  };
}

/**
 * The block under (x, y), or -1.  Binary search within the lane, so hovering
 * stays cheap with thousands of chunks; a miss by less than 3 px still hits
 * the nearest block, since 1-px blocks are hard to point at.
 */
export function hitTest(layout: Layout, x: number, y: number): number {
  const lane = Math.floor(y / layout.laneHeight);
  if (y < 0 || lane < 0 || lane >= layout.lanes.length) {
    return -1;
  }
  const lo0 = layout.laneStart[lane];
  const hi0 = layout.laneStart[lane + 1];
  // Last block whose left edge is <= x.
  let lo = lo0;
  let hi = hi0;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (layout.blocks[mid].x <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  let best = -1;
  let bestDist = 3;
  // The block starting at or before x first, then one further left (in case
  // of overlap), then the next one to the right; strictly nearer wins.
  for (const k of [lo - 1, lo - 2, lo]) {
    if (k < lo0 || k >= hi0) {
      continue;
    }
    const b = layout.blocks[k];
    const dist = x < b.x ? b.x - x : x > b.x + b.w ? x - (b.x + b.w) : 0;
    if (dist < bestDist) {
      best = k;
      bestDist = dist;
    }
  }
  return best;
}
