/**
 * Pure functions of the extension: reading the report bundle, laying out the
 * timeline, formatting numbers, and editing a cell's magic line.  Nothing here
 * touches the DOM or JupyterLab, so all of it is unit-tested (src/__tests__).
 */

/** The MIME type of parloop's run report (src/parloop/progress/report.py). */
export const REPORT_MIME = 'application/vnd.parloop.report+json';

export interface WorkerSummary {
  name: string;
  iterations: number;
  busy: number;
  chunks: number;
  failed: number;
}

export interface Chunk {
  worker: string;
  start: number;
  count: number;
  /** Seconds from the run's start. */
  t_start: number;
  t_end: number;
  /** Iteration indices that raised. */
  failed: number[];
  /** Re-run here after the engine that first had it died. */
  retried: boolean;
}

export interface RunError {
  index: number;
  values: string;
  type: string;
  message: string;
}

/** Version 1 of the report bundle. */
export interface Report {
  version: number;
  magic: string;
  backend: string;
  total: number | null;
  done: number;
  wall: number;
  busy: number;
  speedup: number;
  imbalance: number;
  interrupted: boolean;
  notes: string[];
  workers: WorkerSummary[];
  chunks: Chunk[];
  errors: RunError[];
}

function num(v: unknown, fallback = 0): number {
  return typeof v === 'number' && Number.isFinite(v) ? v : fallback;
}

function str(v: unknown, fallback = ''): string {
  return typeof v === 'string' ? v : v === undefined || v === null ? fallback : String(v);
}

function list(v: unknown): unknown[] {
  return Array.isArray(v) ? v : [];
}

function record(v: unknown): Record<string, unknown> {
  return v !== null && typeof v === 'object' ? (v as Record<string, unknown>) : {};
}

/**
 * Read a report bundle defensively: a saved notebook may carry a bundle from
 * another parloop version, so missing or mistyped fields get neutral values
 * instead of failing.  Throws only when the data is not a version-1 report.
 */
export function parseReport(data: unknown): Report {
  if (data === null || typeof data !== 'object' || Array.isArray(data)) {
    throw new Error('the report is not a JSON object');
  }
  const d = data as Record<string, unknown>;
  if (d.version !== 1) {
    throw new Error(`unsupported report version ${JSON.stringify(d.version)}`);
  }
  const chunks: Chunk[] = list(d.chunks).map(c => {
    const r = record(c);
    const tStart = num(r.t_start);
    return {
      worker: str(r.worker, '?'),
      start: Math.trunc(num(r.start)),
      count: Math.max(0, Math.trunc(num(r.count))),
      t_start: tStart,
      t_end: Math.max(tStart, num(r.t_end, tStart)),
      failed: list(r.failed).filter(i => typeof i === 'number') as number[],
      retried: r.retried === true
    };
  });
  return {
    version: 1,
    magic: str(d.magic),
    backend: str(d.backend),
    total: typeof d.total === 'number' ? d.total : null,
    done: num(d.done),
    wall: num(d.wall),
    busy: num(d.busy),
    speedup: num(d.speedup),
    imbalance: num(d.imbalance),
    interrupted: d.interrupted === true,
    notes: list(d.notes).map(n => str(n)),
    workers: list(d.workers).map(w => {
      const r = record(w);
      return {
        name: str(r.name, '?'),
        iterations: num(r.iterations),
        busy: num(r.busy),
        chunks: num(r.chunks),
        failed: num(r.failed)
      };
    }),
    chunks,
    errors: list(d.errors).map(e => {
      const r = record(e);
      return {
        index: num(r.index),
        values: str(r.values),
        type: str(r.type),
        message: str(r.message)
      };
    })
  };
}

// ---------------------------------------------------------------- formatting

/** "850 ms", "1.24 s", "12.4 s", "2 min 05 s", "1 h 02 min". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) {
    return '–';
  }
  if (seconds < 1e-3) {
    return `${Math.round(seconds * 1e6)} µs`;
  }
  if (seconds < 1) {
    return `${Math.round(seconds * 1e3)} ms`;
  }
  if (seconds < 10) {
    return `${seconds.toFixed(2)} s`;
  }
  if (seconds < 60) {
    return `${seconds.toFixed(1)} s`;
  }
  const s = Math.round(seconds);
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
  }
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
}

/** Thousands separated by a thin space-free comma: 12345 -> "12,345". */
export function formatCount(n: number): string {
  return Math.round(n)
    .toString()
    .replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

/** "iteration 7" or "iterations 10–19". */
export function formatRange(start: number, count: number): string {
  if (count <= 1) {
    return `iteration ${start}`;
  }
  return `iterations ${start}–${start + count - 1}`;
}

/** The header line's parts, e.g. ["threads", "8 workers", "1,000 / 1,000 iterations", ...]. */
export function headerParts(r: Report): string[] {
  const parts: string[] = [];
  const backend = r.backend || r.magic;
  if (backend) {
    parts.push(backend);
  }
  const n = r.workers.length;
  parts.push(`${n} worker${n === 1 ? '' : 's'}`);
  parts.push(
    r.total === null
      ? `${formatCount(r.done)} iterations`
      : `${formatCount(r.done)} / ${formatCount(r.total)} iterations`
  );
  parts.push(`${formatCount(r.chunks.length)} chunk${r.chunks.length === 1 ? '' : 's'}`);
  parts.push(`wall ${formatDuration(r.wall)}`);
  parts.push(`busy ${formatDuration(r.busy)}`);
  if (r.speedup > 0) {
    parts.push(`speedup ${r.speedup.toFixed(1)}×`);
  }
  if (n > 1) {
    parts.push(`imbalance ${Math.round(r.imbalance * 100)}%`);
  }
  return parts;
}

/** The hover text of one chunk. */
export function chunkTooltip(c: Chunk): string {
  const lines = [
    `${c.worker}: ${formatRange(c.start, c.count)} (${formatCount(c.count)})`,
    `${formatDuration(c.t_start)} → ${formatDuration(c.t_end)} (${formatDuration(
      c.t_end - c.t_start
    )})`
  ];
  if (c.failed.length) {
    const shown = c.failed.slice(0, 5).join(', ');
    const more = c.failed.length > 5 ? ` and ${c.failed.length - 5} more` : '';
    lines.push(`failed: ${shown}${more}`);
  }
  if (c.retried) {
    lines.push('re-run here after its engine died');
  }
  return lines.join('\n');
}

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

// -------------------------------------------------------------------- layout

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

// ---------------------------------------------------------- the magic line

/** Options that only one magic takes (mirrors SPECS in src/parloop/options.py). */
const ONLY: Record<string, string[]> = {
  threaded: ['threads', 'tasks'],
  parallel: ['processes', 'profile', 'cluster_id', 'retries', 'timeout']
};

export type Magic = 'parallel' | 'threaded';

const MAGIC_LINE = /^%%(parallel|threaded)(?:\s+(.*))?$/;

function optionKey(word: string): string {
  const eq = word.indexOf('=');
  return eq < 0 ? word : word.slice(0, eq);
}

function splitLines(source: string): { first: number; lines: string[] } {
  const lines = source.split('\n');
  // IPython drops leading blank lines before it looks for a cell magic.
  let first = 0;
  while (first < lines.length - 1 && lines[first].trim() === '') {
    first++;
  }
  return { first, lines };
}

/** The cell's parloop magic line, parsed, or null when it has none. */
export function readMagicLine(source: string): { magic: Magic; options: string[] } | null {
  const { first, lines } = splitLines(source);
  const m = MAGIC_LINE.exec(lines[first].trim());
  if (!m) {
    return null;
  }
  return { magic: m[1] as Magic, options: (m[2] ?? '').split(/\s+/).filter(Boolean) };
}

/**
 * The cell's source with `%%magic` as its first line.  An existing
 * `%%parallel` / `%%threaded` line is replaced: its options that the new magic
 * also takes are kept, the other magic's own options are dropped, and the
 * `defaults` (from the settings) fill in keys the line does not give.
 * Otherwise the line is inserted above the code.
 */
export function setMagicLine(source: string, magic: Magic, defaults = ''): string {
  const current = readMagicLine(source);
  const other = magic === 'parallel' ? 'threaded' : 'parallel';
  const kept = (current?.options ?? []).filter(w => !ONLY[other].includes(optionKey(w)));
  const keys = new Set(kept.map(optionKey));
  const added = defaults
    .split(/\s+/)
    .filter(Boolean)
    .filter(w => !keys.has(optionKey(w)) && !ONLY[other].includes(optionKey(w)));
  const line = ['%%' + magic, ...kept, ...added].join(' ');
  const { first, lines } = splitLines(source);
  if (current) {
    lines[first] = line;
    return lines.join('\n');
  }
  return source === '' ? line + '\n' : line + '\n' + source;
}

/** The source to run for "Explain parallel loop": the cell with `explain` on its magic line. */
export function explainSource(source: string, defaultMagic: Magic, defaults = ''): string {
  const current = readMagicLine(source);
  const withMagic = current ? source : setMagicLine(source, defaultMagic, defaults);
  const { first, lines } = splitLines(withMagic);
  const parsed = readMagicLine(withMagic)!;
  if (!parsed.options.includes('explain')) {
    lines[first] = lines[first].trimEnd() + ' explain';
  }
  return lines.join('\n');
}

/**
 * The one replacement that turns `before` into `after`: [from, to) of
 * `before` becomes `text`.  Applying only that keeps the undo history and the
 * cursor of the rest of the cell as they were.
 */
export function minimalEdit(
  before: string,
  after: string
): { from: number; to: number; text: string } {
  let p = 0;
  const n = Math.min(before.length, after.length);
  while (p < n && before[p] === after[p]) {
    p++;
  }
  let q = 0;
  while (q < n - p && before[before.length - 1 - q] === after[after.length - 1 - q]) {
    q++;
  }
  return { from: p, to: before.length - q, text: after.slice(p, after.length - q) };
}
