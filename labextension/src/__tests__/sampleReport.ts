import { Report, parseReport } from '../report';

/**
 * A small report of two threads and four chunks (one with a failed iteration,
 * one re-run), as the report, text and layout tests all start from it;
 * `extra` overrides fields.
 */
export function sampleReport(extra: Partial<Report> = {}): Report {
  return parseReport({
    version: 1,
    magic: 'threaded',
    backend: 'threads',
    total: 40,
    done: 40,
    wall: 2,
    busy: 3.5,
    speedup: 1.75,
    imbalance: 0.125,
    interrupted: false,
    notes: [],
    workers: [
      { name: 'thread-0', iterations: 20, busy: 1.9, chunks: 2, failed: 1 },
      { name: 'thread-1', iterations: 20, busy: 1.6, chunks: 2, failed: 0 }
    ],
    chunks: [
      {
        worker: 'thread-0',
        start: 0,
        count: 10,
        t_start: 0,
        t_end: 1,
        failed: [5],
        retried: false
      },
      {
        worker: 'thread-1',
        start: 10,
        count: 10,
        t_start: 0,
        t_end: 0.8,
        failed: [],
        retried: false
      },
      {
        worker: 'thread-1',
        start: 20,
        count: 10,
        t_start: 0.8,
        t_end: 1.6,
        failed: [],
        retried: true
      },
      {
        worker: 'thread-0',
        start: 30,
        count: 10,
        t_start: 1,
        t_end: 1.9,
        failed: [],
        retried: false
      }
    ],
    errors: [{ index: 5, values: 'i=5', type: 'ValueError', message: 'bad' }],
    ...extra
  });
}
