import { describe, expect, it } from 'vitest';

import { parseReport } from '../report';
import { formatTick, hitTest, laneHeightFor, layoutTimeline, niceTicks } from '../timelineLayout';
import { sampleReport } from './sampleReport';

describe('the time axis', () => {
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
    const r = sampleReport();
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
    const layout = layoutTimeline(sampleReport(), { width: 600, labelWidth: 100, statsWidth: 100 });
    const first = layout.blocks.find(b => b.chunk === 0)!;
    // Iteration 5 of 0..9 sits at 55% of the block.
    expect(first.failedX).toEqual([Math.round(100 + 0.55 * 200)]);
    expect(layout.blocks.find(b => b.chunk === 2)!.retried).toBe(true);
  });

  it('adds lanes for workers only seen in chunks, and stretches to the last chunk', () => {
    const r = sampleReport();
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
    const r = sampleReport({ wall: 1000 });
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
  const layout = layoutTimeline(sampleReport(), { width: 600, labelWidth: 100, statsWidth: 100 });
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
