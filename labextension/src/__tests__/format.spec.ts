import { describe, expect, it } from 'vitest';

import {
  Report,
  chunkTooltip,
  explainSource,
  formatCount,
  formatDuration,
  formatRange,
  formatTick,
  headerParts,
  hitTest,
  laneHeightFor,
  layoutTimeline,
  minimalEdit,
  niceTicks,
  parseReport,
  readMagicLine,
  setMagicLine
} from '../format';

function report(extra: Partial<Report> = {}): Report {
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

describe('parseReport', () => {
  it('reads a version-1 report', () => {
    const r = report();
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
    expect(headerParts(report())).toEqual([
      'threads',
      '2 workers',
      '40 / 40 iterations',
      '4 chunks',
      'wall 2.00 s',
      'busy 3.50 s',
      'speedup 1.8×',
      'imbalance 13%'
    ]);
    const unknown = headerParts(report({ total: null, done: 1500, workers: [] }));
    expect(unknown).toContain('1,500 iterations');
    expect(unknown).toContain('0 workers');
  });

  it('describes a chunk on hover', () => {
    const r = report();
    expect(chunkTooltip(r.chunks[0])).toBe(
      'thread-0: iterations 0–9 (10)\n0 µs → 1.00 s (1.00 s)\nfailed: 5'
    );
    expect(chunkTooltip(r.chunks[2])).toContain('re-run here after its engine died');
    const many = { ...r.chunks[0], failed: [1, 2, 3, 4, 5, 6, 7] };
    expect(chunkTooltip(many)).toContain('failed: 1, 2, 3, 4, 5 and 2 more');
  });

  it('picks round ticks', () => {
    expect(niceTicks(2, 4)).toEqual([0, 0.5, 1, 1.5, 2]);
    expect(niceTicks(0.3, 3)).toEqual([0, 0.1, 0.2, 0.3]);
    expect(niceTicks(95, 5)).toEqual([0, 20, 40, 60, 80]);
    expect(niceTicks(0)).toEqual([0]);
    expect(formatTick(0, 2)).toBe('0');
    expect(formatTick(0.2, 0.5)).toBe('200 ms');
    expect(formatTick(1.5, 2)).toBe('1.5 s');
    expect(formatTick(150, 300)).toBe('2:30');
  });
});

describe('layoutTimeline', () => {
  it('gives one lane per worker and one block per chunk', () => {
    const r = report();
    const layout = layoutTimeline(r, { width: 600, labelWidth: 100, statsWidth: 100 });
    expect(layout.lanes.map(l => l.name)).toEqual(['thread-0', 'thread-1']);
    expect(layout.blocks).toHaveLength(4);
    expect(layout.scale).toBeCloseTo(400 / 2);
    // Lane 0 holds chunks 0 and 3, in time order, in alternating shades.
    const lane0 = layout.blocks.filter(b => b.lane === 0);
    expect(lane0.map(b => b.chunk)).toEqual([0, 3]);
    expect(lane0.map(b => b.shade)).toEqual([0, 1]);
    expect(lane0[0].x).toBe(100);
    expect(lane0[0].w).toBeCloseTo(200);
    expect(lane0[1].y).toBe(lane0[0].y);
    expect(layout.blocks.find(b => b.lane === 1)!.y).toBeGreaterThan(lane0[0].y);
    expect(layout.laneStart).toEqual([0, 2, 4]);
    expect(layout.height).toBe(layout.axisY + 20);
  });

  it('puts a red mark at the failed iteration and flags retried chunks', () => {
    const layout = layoutTimeline(report(), { width: 600, labelWidth: 100, statsWidth: 100 });
    const first = layout.blocks.find(b => b.chunk === 0)!;
    // Iteration 5 of 0..9 sits at 55% of the block.
    expect(first.failedX).toEqual([Math.round(100 + 0.55 * 200)]);
    expect(layout.blocks.find(b => b.chunk === 2)!.retried).toBe(true);
  });

  it('adds lanes for workers only seen in chunks, and stretches to the last chunk', () => {
    const r = report();
    r.chunks.push({
      worker: 'engine-9',
      start: 40,
      count: 4,
      t_start: 1,
      t_end: 4,
      failed: [],
      retried: true
    });
    const layout = layoutTimeline(r, { width: 600, labelWidth: 100, statsWidth: 100 });
    expect(layout.lanes.map(l => l.name)).toEqual(['thread-0', 'thread-1', 'engine-9']);
    expect(layout.lanes[2].iterations).toBe(4);
    expect(layout.tMax).toBe(4);
    expect(layout.ticks[layout.ticks.length - 1]).toBeLessThanOrEqual(4);
  });

  it('keeps the shortest chunk 1 px wide', () => {
    const r = report({ wall: 1000 });
    r.chunks.push({
      worker: 'thread-1',
      start: 50,
      count: 1,
      t_start: 500,
      t_end: 500.0001,
      failed: [],
      retried: false
    });
    const layout = layoutTimeline(r, { width: 600 });
    expect(Math.min(...layout.blocks.map(b => b.w))).toBe(1);
  });

  it('thins lanes as workers are added, and lays out 64 x 5000 quickly', () => {
    expect(laneHeightFor(2)).toBe(20);
    expect(laneHeightFor(64)).toBe(6);
    const chunks = [];
    for (let i = 0; i < 64 * 5000; i++) {
      const w = i % 64;
      const k = Math.floor(i / 64);
      chunks.push({
        worker: `engine-${w}`,
        start: i,
        count: 1,
        t_start: k * 0.01,
        t_end: k * 0.01 + 0.009,
        failed: [],
        retried: false
      });
    }
    const r = parseReport({ version: 1, wall: 50, chunks, workers: [] });
    const t0 = Date.now();
    const layout = layoutTimeline(r, { width: 1200 });
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(layout.lanes).toHaveLength(64);
    expect(layout.blocks).toHaveLength(64 * 5000);
  });
});

describe('hitTest', () => {
  const layout = layoutTimeline(report(), { width: 600, labelWidth: 100, statsWidth: 100 });
  const mid = (lane: number) => lane * layout.laneHeight + layout.laneHeight / 2;

  it('finds the block under the pointer', () => {
    expect(layout.blocks[hitTest(layout, 150, mid(0))].chunk).toBe(0);
    expect(layout.blocks[hitTest(layout, 350, mid(0))].chunk).toBe(3);
    expect(layout.blocks[hitTest(layout, 300, mid(1))].chunk).toBe(2);
  });

  it('misses outside the lanes and far from any block', () => {
    expect(hitTest(layout, 150, -1)).toBe(-1);
    expect(hitTest(layout, 150, layout.axisY + 2)).toBe(-1);
    expect(hitTest(layout, 50, mid(0))).toBe(-1);
    expect(hitTest(layout, 490, mid(1))).toBe(-1);
  });

  it('forgives a near miss', () => {
    expect(layout.blocks[hitTest(layout, 98, mid(0))].chunk).toBe(0);
  });
});

describe('the magic line', () => {
  const loop = 'for i in range(3):\n    out[i] = f(i)\n';

  it('inserts a magic line above the code', () => {
    expect(setMagicLine(loop, 'parallel')).toBe('%%parallel\n' + loop);
    expect(setMagicLine(loop, 'threaded', 'threads=8')).toBe('%%threaded threads=8\n' + loop);
    expect(setMagicLine('', 'threaded')).toBe('%%threaded\n');
  });

  it('replaces an existing line, keeping the options both magics take', () => {
    const cell = '%%threaded threads=8 chunksize=4 seed=1\n' + loop;
    expect(setMagicLine(cell, 'parallel')).toBe('%%parallel chunksize=4 seed=1\n' + loop);
    expect(
      setMagicLine('%%parallel processes=4 retries=2\n' + loop, 'threaded', 'threads=16')
    ).toBe('%%threaded threads=16\n' + loop);
  });

  it('lets options on the line win over the defaults, and is idempotent', () => {
    const cell = '%%parallel processes=2\n' + loop;
    expect(setMagicLine(cell, 'parallel', 'processes=8 on_error=collect')).toBe(
      '%%parallel processes=2 on_error=collect\n' + loop
    );
    const once = setMagicLine(loop, 'parallel', 'processes=8');
    expect(setMagicLine(once, 'parallel', 'processes=8')).toBe(once);
  });

  it('looks past leading blank lines, as IPython does', () => {
    expect(setMagicLine('\n\n%%threaded\n' + loop, 'parallel')).toBe('\n\n%%parallel\n' + loop);
    expect(readMagicLine('\n%%threaded threads=2\nx')).toEqual({
      magic: 'threaded',
      options: ['threads=2']
    });
    expect(readMagicLine('%%time\nx')).toBeNull();
  });

  it('adds explain once, with the default magic when there is none', () => {
    expect(explainSource(loop, 'parallel')).toBe('%%parallel explain\n' + loop);
    expect(explainSource('%%threaded threads=2\n' + loop, 'parallel')).toBe(
      '%%threaded threads=2 explain\n' + loop
    );
    expect(explainSource('%%threaded explain\n' + loop, 'parallel')).toBe(
      '%%threaded explain\n' + loop
    );
  });

  it('edits only what changed', () => {
    expect(minimalEdit('%%threaded\nfor', '%%parallel\nfor')).toEqual({
      from: 2,
      to: 10,
      text: 'parallel'
    });
    expect(minimalEdit('for', '%%parallel\nfor')).toEqual({ from: 0, to: 0, text: '%%parallel\n' });
    expect(minimalEdit('abc', 'abc')).toEqual({ from: 3, to: 3, text: '' });
    expect(minimalEdit('aa', 'aaa')).toEqual({ from: 2, to: 2, text: 'a' });
  });
});
