/**
 * The run report bundle (src/parloop/progress/report.py): its MIME type, its
 * fields, and the defensive reader that every view of a report starts from.
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
