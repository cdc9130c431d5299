import { describe, expect, it } from 'vitest';

import { parseReport } from '../report';
import { sampleReport } from './sampleReport';

describe('parseReport', () => {
  it('reads a version-1 report', () => {
    const r = sampleReport();
    expect(r.workers.map(w => w.name)).toEqual(['thread-0', 'thread-1']);
    expect(r.chunks[2].retried).toBe(true);
    expect(r.chunks[0].failed).toEqual([5]);
    expect(r.errors[0].type).toBe('ValueError');
  });

  it('rejects what is not a version-1 report', () => {
    expect(() => parseReport(null)).toThrow(/not a JSON object/);
    expect(() => parseReport([1])).toThrow(/not a JSON object/);
    expect(() => parseReport({ version: 2 })).toThrow(/version 2/);
  });

  it('fills missing or mistyped fields with neutral values', () => {
    const r = parseReport({
      version: 1,
      total: 'many',
      chunks: [{ worker: 3, start: 1.7, count: -2, t_start: 2, t_end: 1, failed: ['x', 4] }],
      workers: 'none'
    });
    expect(r.total).toBeNull();
    expect(r.workers).toEqual([]);
    expect(r.chunks[0]).toEqual({
      worker: '3',
      start: 1,
      count: 0,
      t_start: 2,
      t_end: 2,
      failed: [4],
      retried: false
    });
    expect(r.notes).toEqual([]);
  });
});
