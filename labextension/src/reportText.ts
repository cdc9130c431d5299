/**
 * The words and numbers a report is shown with: durations, counts, iteration
 * ranges, the header line and a chunk's hover text.
 */
import { Chunk, Report } from './report';

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
