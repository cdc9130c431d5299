import { describe, expect, it } from 'vitest';

import { chunkTooltip, formatCount, formatDuration, formatRange, headerParts } from '../reportText';
import { sampleReport } from './sampleReport';

describe('formatting', () => {
  it('formats durations in a fitting unit', () => {
    expect(formatDuration(0.0000042)).toBe('4 µs');
    expect(formatDuration(0.25)).toBe('250 ms');
    expect(formatDuration(1.2345)).toBe('1.23 s');
    expect(formatDuration(12.34)).toBe('12.3 s');
    expect(formatDuration(125)).toBe('2 min 05 s');
    expect(formatDuration(3720)).toBe('1 h 02 min');
    expect(formatDuration(-1)).toBe('–');
    expect(formatDuration(NaN)).toBe('–');
  });

  it('formats counts and ranges', () => {
    expect(formatCount(1234567)).toBe('1,234,567');
    expect(formatCount(999)).toBe('999');
    expect(formatRange(7, 1)).toBe('iteration 7');
    expect(formatRange(10, 10)).toBe('iterations 10–19');
  });

  it('builds the header from the totals', () => {
    expect(headerParts(sampleReport())).toEqual([
      'threads',
      '2 workers',
      '40 / 40 iterations',
      '4 chunks',
      'wall 2.00 s',
      'busy 3.50 s',
      'speedup 1.8×',
      'imbalance 13%'
    ]);
    const unknown = headerParts(sampleReport({ total: null, done: 1500, workers: [] }));
    expect(unknown).toContain('1,500 iterations');
    expect(unknown).toContain('0 workers');
  });

  it('describes a chunk on hover', () => {
    const r = sampleReport();
    expect(chunkTooltip(r.chunks[0])).toBe(
      'thread-0: iterations 0–9 (10)\n0 µs → 1.00 s (1.00 s)\nfailed: 5'
    );
    expect(chunkTooltip(r.chunks[2])).toContain('re-run here after its engine died');
    const many = { ...r.chunks[0], failed: [1, 2, 3, 4, 5, 6, 7] };
    expect(chunkTooltip(many)).toContain('failed: 1, 2, 3, 4, 5 and 2 more');
  });
});
